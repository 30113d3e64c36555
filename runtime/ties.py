"""The exactness contract's one exception: near-ties that a graph's rounding can flip.

Greedy speculative output equals plain greedy output token for token, except where the
target's two best logits at some step are so close that the kernels' rounding orders them
differently: the tree pass runs other kernel shapes (T rows instead of 1) than the plain
step, and a reduction summed in another order moves a logit by a few units in the last
place. Such a step is a *tie*: the two tokens' logits lie within ``TIE_TOLERANCE`` (of the
dtype the LM graph computes in) of the step's largest magnitude. Both continuations are
then equally the target's greedy choice; after it the two outputs go their own ways.

Quantized weights on ONNX Runtime (``MatMulNBits`` at accuracy level 4: ``--weights
int4|int8``) also round every product's activations to int8 per block of 32. A row's float
inputs differ by a unit in the last place between the tree pass and the plain step
(``GroupQueryAttention`` over T query rows or one: 6e-7 apart, measured); where that moves an activation across a
rounding boundary the step's int8 product moves by a whole step, and 30 layers add those
up: the same row's logits then differ by up to ~1e-2 of the largest (the demo's int4
target: 14 of 14 chat answers of 128 tokens parted from plain decoding within 1-119
tokens, at gaps of 1.5e-4 to 1.4e-2). Both are the quantized target's greedy choices,
within its own rounding; ``tie_tolerance`` holds such targets to ``ROUNDED_ACTIVATIONS``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .families import Prompt
from .masks import causal_mask
from .target import TargetModel
from .weights import FLOAT

# Relative logit gap under which two tokens count as tied: fp32 sums of a few thousand
# terms reordered move a logit by ~1e-6 of the largest; fp16 rounds every product (2^-11).
ROUNDED_ACTIVATIONS = "int8 activations"  # level-4 MatMulNBits (measured gaps <= 1.4e-2)
TIE_TOLERANCE = {"float32": 1e-5, "float16": 4e-3, ROUNDED_ACTIVATIONS: 3e-2}


def tie_tolerance(target: TargetModel) -> float:
    """The relative logit gap under which ``target`` may order two tokens either way: its
    compute dtype's, or ``ROUNDED_ACTIVATIONS`` for quantized weights on ONNX Runtime
    (TensorRT engines carry weight-only products: float activations)."""
    if target.backend == "ort" and target.facts.get("weights", FLOAT) != FLOAT:
        return TIE_TOLERANCE[ROUNDED_ACTIVATIONS]
    return TIE_TOLERANCE[np.dtype(target.dtype).name]


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
    return Divergence(n, gap, tie_tolerance(target))
