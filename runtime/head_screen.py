"""Greedy tokens of a float32 LM head from its certified screen (``exporter.head_screen``).

The screen graph bounds every logit of each row from above (``screen_upper``) and the row's
largest from below (``screen_floor``): only rows whose upper bound reaches the floor can be
the argmax (``screen_candidates``: ~3 of 49k on the demo's target), and those are scored
exactly (float64 dots of the float32 weights). The token is the float head's argmax but
where two logits tie within float32 rounding (the lowest id wins among exact ties, as
``np.argmax``).

The bounds assume ONNX Runtime's level-4 8-bit ``MatMulNBits`` rounds activations per block
of 32 at ``max |h_b| / 127`` (checked on ONNX Runtime 1.32's x86 kernels): ``holds`` tests it
at load on states with outliers against float64 logits, and the target drops a screen that
fails (float head).
"""
from __future__ import annotations

import numpy as np

from .backends.base import GraphRunner
from .errors import ManifestError, VispecError
from .specs import HIDDEN_STATES, NEW, SCREEN_CANDIDATES, SCREEN_FLOOR, SCREEN_UPPER

SCREEN = "screen"  # the graph's name in a target's manifest
HEAD_WEIGHTS = "lm_head"  # its extra file's key: the float head's weights [V, H]
# Rows a step screens at most: the 8-bit kernel's time grows with the rows, the float head's
# hardly (``benchmarks/head_screen.py``, 2 cores: whole steps 1.10x as fast at 1 row, 1.04x
# at 8, even at 12-16)
MAX_ROWS = 8
CHECK_ROWS, CHECK_CHUNK = 4, 4096  # load-time check: states; vocabulary rows a float64 product


class HeadScreen:
    """``argmax(hidden)``: each row's greedy token, from the screen graph and ``weight
    [V, H]`` (the float head)."""

    def __init__(self, runner: GraphRunner, weight: np.ndarray):
        outputs = {t.name for t in runner.spec.outputs}
        if not {SCREEN_CANDIDATES, SCREEN_UPPER, SCREEN_FLOOR} <= outputs:
            raise ManifestError(f"the {SCREEN} graph's outputs {sorted(outputs)} are not this "
                                f"runtime's ({SCREEN_CANDIDATES}, {SCREEN_UPPER}, "
                                f"{SCREEN_FLOOR}). Hint: re-export the target")
        self.runner, self.weight = runner, weight
        self._outputs: dict[int, dict[str, np.ndarray]] = {}  # rows -> kept output buffers

    def run(self, hidden: np.ndarray) -> dict[str, np.ndarray]:
        """The screen's outputs ``[S, ...]`` for ``hidden [S, H]`` (buffers reused by the
        next call with as many rows)."""
        n = len(hidden)
        outputs = self._outputs.get(n)
        if outputs is None:
            spec = self.runner.spec
            outputs = self._outputs[n] = {
                name: np.empty(spec.shape(name, {NEW: n}), spec.tensor(name).np_dtype)
                for name in (SCREEN_CANDIDATES, SCREEN_UPPER, SCREEN_FLOOR)}
        out = self.runner.infer({HIDDEN_STATES: np.ascontiguousarray(hidden[None], np.float32)},
                                outputs)
        return {name: array[0] for name, array in out.items()}

    def argmax(self, hidden: np.ndarray) -> np.ndarray:
        """The greedy token ``[S]`` of each row of ``hidden [S, H]``."""
        candidates = self.run(hidden)[SCREEN_CANDIDATES]  # [S, V]
        # flat: numpy's 2-D nonzero takes ~15x as long (1.3 ms at 16 x 49k)
        rows, cols = np.divmod(np.flatnonzero(candidates), candidates.shape[1])
        scores = np.einsum("nh,nh->n", self.weight[cols], hidden[rows], dtype=np.float64)
        order = np.lexsort((cols, -scores, rows))  # per row: best score, then lowest id
        rows, cols = rows[order], cols[order]
        first = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
        if len(first) != len(hidden):
            raise VispecError("the LM's hidden states are not finite: no greedy token. Hint: "
                              "check the inputs (embeddings, positions) of this step")
        return cols[first]

    def holds(self, seed: int = 0) -> bool:
        """Whether the screen's bounds hold on this machine's kernel, on states with outlier
        channels: every float64 logit at most its upper bound, each row's largest at least
        its floor."""
        rng = np.random.default_rng(seed)
        width = self.weight.shape[1]
        hidden = rng.standard_normal((CHECK_ROWS, width)).astype(np.float32)
        hidden[:, rng.choice(width, 4, replace=False)] *= 30
        out = self.run(hidden)
        exact = np.concatenate([hidden.astype(np.float64) @ self.weight[i:i + CHECK_CHUNK].T
                                .astype(np.float64) for i in range(0, len(self.weight),
                                                                   CHECK_CHUNK)], axis=1)
        return bool(np.all(exact <= out[SCREEN_UPPER])
                    and np.all(out[SCREEN_FLOOR][:, 0] <= exact.max(-1)))

    def close(self) -> None:
        self.runner.close()
