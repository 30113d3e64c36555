"""The exactness contract's one exception: near-ties that a graph's rounding can flip.

Greedy speculative output equals plain greedy output token for token, except where the
target's two best logits at some step are so close that the kernels' rounding orders them
differently: the tree pass runs other kernel shapes (T rows instead of 1) than the plain
step, and a reduction summed in another order moves a logit by a few units in the last
place. Such a step is a *tie*: the two tokens' logits lie within ``TIE_TOLERANCE`` (of the
dtype the LM graph computes in) of the step's largest magnitude. Both continuations are
then equally the target's greedy choice; after it the two outputs go their own ways.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .families import Prompt
from .masks import causal_mask
from .target import TargetModel

# Relative logit gap under which two tokens count as tied: fp32 sums of a few thousand
# terms reordered move a logit by ~1e-6 of the largest; fp16 rounds every product (2^-11).
TIE_TOLERANCE = {"float32": 1e-5, "float16": 4e-3}


@dataclass(frozen=True)
class Divergence:
    """Where two token sequences first differ, and how close the target's logits there were."""

    position: int   # index of the first differing token
    gap: float      # |logit a - logit b| / max |logit| at that step (teacher-forced)
    tolerance: float

    @property
    def is_tie(self) -> bool:
        return self.gap <= self.tolerance


def teacher_forced_logits(target: TargetModel, prompt: Prompt, tokens: list[int]) -> np.ndarray:
    """Logits ``[n, V]`` predicting each of ``tokens`` given the prompt and the tokens before
    it (one LM pass over the whole sequence)."""
    embeds = target.prompt_embeds(prompt)
    if len(tokens) > 1:  # the first token is predicted from the prompt alone
        embeds = np.concatenate([embeds, target.embed(np.asarray(tokens[:-1], np.int64))
                                 .astype(np.float32)])
    positions, next_pos = target.glue.position_ids(prompt)
    steps = target.glue.step_position_ids(next_pos, np.arange(len(tokens) - 1))
    positions = np.concatenate([positions, steps], axis=-1)
    out = target.step(target.new_cache(), embeds, positions, causal_mask(0, len(embeds)))
    return out.logits[len(prompt.input_ids) - 1:].astype(np.float32)


def first_divergence(target: TargetModel, prompt: Prompt, a: list[int],
                     b: list[int]) -> Divergence | None:
    """None when ``a`` and ``b`` agree (one may stop earlier, at EOS or its budget); else
    the first differing step and the target's logit gap there between the two tokens."""
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    if n is None:
        return None
    logits = teacher_forced_logits(target, prompt, a[:n + 1])[n]  # [V]
    gap = abs(float(logits[a[n]] - logits[b[n]])) / max(float(np.abs(logits).max()), 1e-30)
    return Divergence(n, gap, TIE_TOLERANCE[np.dtype(target.dtype).name])
