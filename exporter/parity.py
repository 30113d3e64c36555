"""Parity rows: one graph output compared with its PyTorch reference, against a tolerance."""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

# Max abs error allowed, relative to the reference's max magnitude, per precision (the
# bound where no PyTorch run at the artifact's precision is available).
TOLERANCES = {"float32": 1e-4, "float16": 2e-2, "int8": 2.5e-1, "int4": 1.0}
# Reduced precision against PyTorch's own error at that precision on the same inputs (its
# forward's, or exact math on the rounded weights with rounded IO where that is larger: no
# graph at that precision can beat it): the export may err RATIO times as much, plus SLACK
# relative (two float16 unit roundoffs: at that level both errors are rounding noise).
BASELINE_RATIO = 1.25
BASELINE_SLACK = {"float16": 2 * 2.0 ** -11}


@dataclass(frozen=True)
class ParityRow:
    graph: str
    case: str
    output: str
    max_abs: float
    rel: float   # max_abs / max |reference|
    tol: float   # bound on ``rel``
    baseline: float | None = None  # ``rel`` of PyTorch's own forward at ``precision``
    weights_floor: float | None = None  # ``rel`` of float32 math on the rounded weights
    precision: str = "float32"

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.rel) and self.rel <= self.tol)

    @property
    def reference_error(self) -> float | None:
        """PyTorch's own error at ``precision``: its forward's, or the weights' floor."""
        known = [e for e in (self.baseline, self.weights_floor) if e is not None]
        return max(known) if known else None

    @property
    def ratio(self) -> float | None:
        """``rel`` over PyTorch's own error at the same precision."""
        ref = self.reference_error
        return None if ref is None else self.rel / max(ref, 1e-12)


def tolerance(precision: str, reference_error: float | None = None) -> float:
    """The bound on the relative error: fixed per precision, or relative to PyTorch's own
    error at that precision where one was measured."""
    if reference_error is None or precision not in BASELINE_SLACK:
        return TOLERANCES[precision]
    return BASELINE_RATIO * reference_error + BASELINE_SLACK[precision]


def relative_error(got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
    """``(max |got - want|, that over max |want|)``; infinite on a shape mismatch."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    if got.shape != want.shape:
        return float("inf"), float("inf")
    err = float(np.max(np.abs(got - want))) if got.size else 0.0
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    return err, err / max(scale, 1e-12)


def compare(graph: str, case: str, output: str, got: np.ndarray, want: np.ndarray,
            precision: str = "float32", baseline: float | None = None,
            weights_floor: float | None = None) -> ParityRow:
    """Compare ``got`` (engine) with ``want`` (PyTorch float32) under ``precision``'s
    tolerance; ``baseline`` and ``weights_floor`` are the relative errors of PyTorch's own
    forward at ``precision`` and of float32 math on the rounded weights, if measured."""
    err, rel = relative_error(got, want)
    row = ParityRow(graph, case, output, err, rel, 0.0, baseline, weights_floor, precision)
    return replace(row, tol=tolerance(precision, row.reference_error))


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
