"""Backend-neutral graph runner: checks inputs against the spec, then runs ``_infer_impl``."""
from __future__ import annotations

import numpy as np

from ..device import is_device
from ..errors import ShapeError
from ..specs import GraphSpec


class GraphRunner:
    """Runs one graph over named buffers; subclasses implement ``_infer_impl``.

    Feeds and ``outputs`` are numpy arrays or ``DeviceTensor`` s (``runtime.device``).
    ``outputs`` may hold preallocated buffers (e.g. views of a KV cache) that the backend
    writes in place; outputs not given are allocated by the runner as numpy arrays.
    """

    def __init__(self, spec: GraphSpec):
        self.spec = spec

    def infer(self, feeds: dict[str, np.ndarray],
              outputs: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        sizes = self.spec.check_inputs(feeds)
        outputs = dict(outputs or {})
        for name, array in outputs.items():
            want, dtype = self.spec.shape(name, sizes), self.spec.tensor(name).np_dtype
            contiguous = is_device(array) or array.flags.c_contiguous
            if array.shape != want or array.dtype != dtype or not contiguous:
                raise ShapeError(f"graph {self.spec.name!r}: output buffer {name!r} is "
                                 f"{array.dtype} {array.shape} (contiguous={contiguous}). "
                                 f"Expected: a contiguous {dtype} {want} (the graph's output)")
        for t in self.spec.outputs:
            if t.name not in outputs:
                outputs[t.name] = np.empty(self.spec.shape(t.name, sizes), t.np_dtype)
        self._infer_impl(feeds, outputs)
        return outputs

    def _infer_impl(self, feeds: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Release backend resources."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
