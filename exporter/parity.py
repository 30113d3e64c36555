"""Parity rows: one graph output compared with its PyTorch reference, against a tolerance."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Max abs error allowed, relative to the reference's max magnitude, per precision.
TOLERANCES = {"float32": 1e-4, "float16": 2e-2, "int8": 1.5e-1}


@dataclass(frozen=True)
class ParityRow:
    graph: str
    case: str
    output: str
    max_abs: float
    rel: float   # max_abs / max |reference|
    tol: float   # bound on ``rel``

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.rel) and self.rel <= self.tol)


def compare(graph: str, case: str, output: str, got: np.ndarray, want: np.ndarray,
            precision: str = "float32") -> ParityRow:
    """Compare ``got`` (engine) with ``want`` (PyTorch) under ``precision``'s tolerance."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    if got.shape != want.shape:
        return ParityRow(graph, case, output, float("inf"), float("inf"), TOLERANCES[precision])
    err = float(np.max(np.abs(got - want))) if got.size else 0.0
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    return ParityRow(graph, case, output, err, err / max(scale, 1e-12), TOLERANCES[precision])


def random_tree(rng: np.random.Generator, size: int,
                forest: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Random parents (``parents[i] < i``; -1 for a root) and the ancestor mask ``[T, T]``
    (incl. self). One root (node 0) unless ``forest``, where any node may start a tree
    (a drafter's first tree level hangs off its prefix, not off a tree node)."""
    parents = np.array([-1] + [int(rng.integers(-1 if forest else 0, i)) for i in range(1, size)])
    mask = np.eye(size, dtype=bool)
    for i in range(1, size):
        if parents[i] >= 0:
            mask[i] |= mask[parents[i]]
    return parents, mask
