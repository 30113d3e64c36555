"""Where a prompt's images are, as the drafters see them (numpy only).

ViSpec compresses each run of image tokens; HiViS removes the image from the drafter's input,
with a per-family rule for which tokens go and which positions the rest keep.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from ..errors import VispecError
from ..families import FamilyGlue
from ..families.base import runs

# model_type -> (glue, input_ids [L]) -> (kept token indices [T], their positions [T])
TextRows = Callable[[FamilyGlue, np.ndarray], tuple[np.ndarray, np.ndarray]]
_HIVIS_LAYOUTS: dict[str, TextRows] = {}


def hivis_layout(*model_types: str):
    """Decorator: the HiViS text-row rule of the given target families."""
    def register(fn: TextRows) -> TextRows:
        for model_type in model_types:
            _HIVIS_LAYOUTS[model_type] = fn
        return fn
    return register


def hivis_text_rows(glue: FamilyGlue, input_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the prompt tokens HiViS keeps and the positions they take."""
    if glue.model_type not in _HIVIS_LAYOUTS:
        raise VispecError(f"HiViS has no image layout for target family {glue.model_type!r} "
                          f"(known: {sorted(_HIVIS_LAYOUTS)})")
    return _HIVIS_LAYOUTS[glue.model_type](glue, np.asarray(input_ids))


@hivis_layout("llava", "llava_next")
def _llava_rows(glue: FamilyGlue, input_ids: np.ndarray):
    """LLaVA: image tokens removed, the text re-numbered contiguously."""
    kept = np.flatnonzero(input_ids != glue.image_token_id)
    return kept, np.arange(len(kept), dtype=np.int64)


@hivis_layout("qwen2_5_vl")
def _qwen_rows(glue: FamilyGlue, input_ids: np.ndarray):
    """Qwen2.5-VL: <|vision_start|>..<|vision_end|> removed, text keeps its ordinal (a gap)."""
    start = int(glue.config["vision_start_token_id"])
    end = int(glue.config["vision_end_token_id"])
    inside = np.cumsum(input_ids == start) - np.cumsum(input_ids == end)  # > 0 within a span
    kept = np.flatnonzero((inside == 0) & (input_ids != end))
    return kept, kept.astype(np.int64)


def image_runs(is_image: np.ndarray) -> list[tuple[int, int]]:
    """``[start, end)`` of every maximal run of True in ``is_image [L]``."""
    return [(start, end) for value, start, end in runs(is_image.astype(np.int8)) if value]
