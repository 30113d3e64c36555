"""Backend-neutral graph runner: checks inputs against the spec, then runs ``_infer_impl``."""
from __future__ import annotations

import os
from types import MappingProxyType
from typing import Mapping

import numpy as np

from ..device import is_device
from ..errors import ShapeError
from ..specs import GraphSpec

NOTHING_HELD: tuple[Mapping, Mapping] = (MappingProxyType({}), MappingProxyType({}))


class GraphRunner:
    """Runs one graph over named buffers; subclasses implement ``_infer_impl``.

    Feeds and ``outputs`` are numpy arrays or ``DeviceTensor`` s (``runtime.device``).
    ``outputs`` may hold preallocated buffers (e.g. views of a KV cache) that the backend
    writes in place; outputs not given are allocated by the runner as numpy arrays.
    ``held``: a pair of mappings (inputs, outputs) of buffers that stay the same between
    calls (a heads-major KV cache's slabs): passed again as the same objects, they are
    neither checked nor bound again (a decode step then costs its few small tensors).
    """

    def __init__(self, spec: GraphSpec):
        self.spec = spec
        # Full checks of every call (VISPEC_FULL_CHECKS=1), else once per layout of the
        # feeds and output buffers (names, dtypes, ranks) and the profile ranges every call.
        self.full_checks = os.environ.get("VISPEC_FULL_CHECKS") == "1"
        self._checked: set[tuple] = set()
        self._held: tuple = (None, None)  # the held mappings of the last call

    def infer(self, feeds: dict[str, np.ndarray], outputs: dict[str, np.ndarray] | None = None,
              held: tuple[Mapping, Mapping] = NOTHING_HELD) -> dict[str, np.ndarray]:
        """Run the graph; returns ``outputs``' buffers and new arrays for the outputs neither
        they nor ``held`` give."""
        outputs = dict(outputs or {})
        layout = (tuple((k, v.dtype, v.ndim) for k, v in feeds.items()),
                  tuple((k, v.dtype, v.ndim) for k, v in outputs.items()), id(held[0]), id(held[1]))
        new_held = held[0] is not self._held[0] or held[1] is not self._held[1]
        if self.full_checks or new_held or layout not in self._checked:
            sizes = self._check({**feeds, **held[0]}, {**outputs, **held[1]})
            self._checked.add(layout)
            self._held = held
        else:
            sizes = self.spec.dim_sizes(feeds, held[0])
        if len(outputs) + len(held[1]) < len(self.spec.outputs):
            for t in self.spec.outputs:
                if t.name not in outputs and t.name not in held[1]:
                    outputs[t.name] = np.empty(self.spec.shape(t.name, sizes), t.np_dtype)
        self._infer_held(feeds, outputs, held, new_held)
        return outputs

    def _check(self, feeds: dict, outputs: dict) -> dict[str, int]:
        """Every input against the spec and every output buffer against the shapes it
        implies; returns the dim sizes."""
        sizes = self.spec.check_inputs(feeds)
        for name, array in outputs.items():
            want, dtype = self.spec.shape(name, sizes), self.spec.tensor(name).np_dtype
            contiguous = is_device(array) or array.flags.c_contiguous
            if array.shape != want or array.dtype != dtype or not contiguous:
                raise ShapeError(f"graph {self.spec.name!r}: output buffer {name!r} is "
                                 f"{array.dtype} {array.shape} (contiguous={contiguous}). "
                                 f"Expected: a contiguous {dtype} {want} (the graph's output)")
        return sizes

    def _infer_impl(self, feeds: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        raise NotImplementedError

    def _infer_held(self, feeds: dict, outputs: dict, held: tuple[Mapping, Mapping],
                    changed: bool) -> None:
        """Run with ``held`` buffers (``changed``: other mappings than the last call's): a
        backend that keeps bindings between calls overrides this; by default every buffer
        is passed each call."""
        self._infer_impl({**feeds, **held[0]}, {**outputs, **held[1]})

    def close(self) -> None:
        """Release backend resources."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
