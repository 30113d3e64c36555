"""Boolean attention masks ``[1, 1, new, past + new]`` for the step graphs."""
from __future__ import annotations

import numpy as np


def causal_mask(past: int, new: int) -> np.ndarray:
    """New token i sees all ``past`` keys and new tokens 0..i (prefill and decode)."""
    return np.tri(new, past + new, k=past, dtype=bool)[None, None]


def tree_mask(past: int, ancestors: np.ndarray) -> np.ndarray:
    """Tree nodes see all ``past`` keys and their ancestors (``ancestors [T, T]``, incl. self)."""
    t = ancestors.shape[0]
    return np.concatenate([np.ones((t, past), bool), ancestors.astype(bool)], axis=1)[None, None]
