"""Greedy tokens of a float32 LM head from its certified screen (``exporter.head_screen``).

The screen graph bounds every logit of each row (``screen_lower <= W h <= screen_upper``);
only rows whose upper bound reaches the row's highest lower bound can be its argmax (~3 of
49k on the demo's target), and those are scored exactly (float64 dots of the float32
weights). The token is the same as the float head's argmax but where two logits tie within
float32 rounding (the lowest id wins among exact ties, as ``np.argmax``).

The bound assumes ONNX Runtime's level-4 8-bit ``MatMulNBits`` rounds activations per block
of 32 at ``max |h_b| / 127`` (checked on ONNX Runtime 1.32's x86 kernels): ``holds`` tests it
at load on states with outliers, and the target drops a screen that fails (float head).
"""
from __future__ import annotations

import numpy as np

from .backends.base import GraphRunner
from .errors import VispecError
from .specs import HIDDEN_STATES, NEW, SCREEN_LOWER, SCREEN_UPPER

SCREEN = "screen"  # the graph's name in a target's manifest
HEAD_WEIGHTS = "lm_head"  # its extra file's key: the float head's weights [V, H]
CHECK_ROWS, CHECK_VOCAB = 4, 4096  # load-time check: states, and vocabulary rows scored


class HeadScreen:
    """``argmax(hidden)``: each row's greedy token, from the screen graph and ``weight
    [V, H]`` (the float head)."""

    def __init__(self, runner: GraphRunner, weight: np.ndarray):
        self.runner, self.weight = runner, weight
        self._outputs: dict[int, dict[str, np.ndarray]] = {}  # rows -> kept output buffers

    def bounds(self, hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(lower, upper)`` ``[S, V]`` of the logits of ``hidden [S, H]``."""
        n = len(hidden)
        outputs = self._outputs.get(n)
        if outputs is None:
            spec = self.runner.spec
            outputs = self._outputs[n] = {
                name: np.empty(spec.shape(name, {NEW: n}), np.float32)
                for name in (SCREEN_LOWER, SCREEN_UPPER)}
        out = self.runner.infer({HIDDEN_STATES: np.ascontiguousarray(hidden[None], np.float32)},
                                outputs)
        return out[SCREEN_LOWER][0], out[SCREEN_UPPER][0]

    def argmax(self, hidden: np.ndarray) -> np.ndarray:
        """The greedy token ``[S]`` of each row of ``hidden [S, H]``."""
        lower, upper = self.bounds(hidden)
        rows, cols = np.nonzero(upper >= lower.max(-1, keepdims=True))
        scores = np.einsum("nh,nh->n", self.weight[cols], hidden[rows], dtype=np.float64)
        order = np.lexsort((cols, -scores, rows))  # per row: best score, then lowest id
        rows, cols = rows[order], cols[order]
        first = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
        if len(first) != len(hidden):
            raise VispecError("the LM's hidden states are not finite: no greedy token. Hint: "
                              "check the inputs (embeddings, positions) of this step")
        return cols[first]

    def holds(self, seed: int = 0) -> bool:
        """Whether the screen's bounds hold on this machine's kernel: states with outlier
        channels, float64 logits of ``CHECK_VOCAB`` vocabulary rows (those of the largest
        magnitude, where rounding weighs most, and random ones)."""
        rng = np.random.default_rng(seed)
        vocab, width = self.weight.shape
        hidden = rng.standard_normal((CHECK_ROWS, width)).astype(np.float32)
        hidden[:, rng.choice(width, 4, replace=False)] *= 30
        lower, upper = self.bounds(hidden)
        norms = np.abs(self.weight).sum(-1)
        half = min(vocab, CHECK_VOCAB // 2)
        rows = np.unique(np.r_[np.argsort(norms)[-half:], rng.choice(vocab, half, replace=False)])
        exact = hidden.astype(np.float64) @ self.weight[rows].astype(np.float64).T
        return bool(np.all(lower[:, rows] <= exact) and np.all(exact <= upper[:, rows]))

    def close(self) -> None:
        self.runner.close()
