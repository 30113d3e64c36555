"""Boolean attention masks ``[1, 1, new, past + new]`` for the step graphs."""
from __future__ import annotations

import numpy as np

_VISIBLE = np.ones(0, bool)  # decode masks: views of one read-only all-True row


def causal_mask(past: int, new: int) -> np.ndarray:
    """New token i sees all ``past`` keys and new tokens 0..i (prefill and decode). A
    decode step's (``new`` 1) is a read-only view of a row kept between calls."""
    global _VISIBLE
    if new != 1:
        return np.tri(new, past + new, k=past, dtype=bool)[None, None]
    if len(_VISIBLE) <= past:
        _VISIBLE = np.ones(max(2 * (past + 1), 1024), bool)
        _VISIBLE.flags.writeable = False
    return _VISIBLE[None, None, None, :past + 1]


def tree_mask(past: int, ancestors: np.ndarray) -> np.ndarray:
    """Tree nodes see all ``past`` keys and their ancestors (``ancestors [T, T]``, incl. self)."""
    t = ancestors.shape[0]
    return np.concatenate([np.ones((t, past), bool), ancestors.astype(bool)], axis=1)[None, None]
