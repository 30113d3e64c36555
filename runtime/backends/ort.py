"""ONNX Runtime backend: IO binding straight onto caller-owned numpy buffers (no copies)."""
from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort

from ..errors import VispecError
from ..specs import GraphSpec
from .base import GraphRunner

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def available_providers() -> list[str]:
    return ort.get_available_providers()


class OrtRunner(GraphRunner):
    """One ``InferenceSession`` per graph; inputs and outputs bound by pointer.

    Host buffers are bound for every provider: on CPU this is zero-copy (KV views are
    read and written in place); on CUDA ONNX Runtime copies them across.
    """

    def __init__(self, path: str | os.PathLike, spec: GraphSpec, *,
                 providers: list[str] | None = None, threads: int | None = None):
        super().__init__(spec)
        providers = providers or [CPU]
        missing = [p for p in providers if p not in available_providers()]
        if missing:
            raise VispecError(f"ONNX Runtime providers {missing} are not available (have "
                              f"{available_providers()}). Hint: install onnxruntime-gpu for "
                              f"CUDA, or use the CPU provider")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        # Several sessions (target + drafter graphs) run back to back on the same cores:
        # spinning pools of one session would steal the cores the next one needs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.binding = self.session.io_binding()

    def _infer_impl(self, feeds: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        b = self.binding
        b.clear_binding_inputs()
        b.clear_binding_outputs()
        keep = []  # contiguous copies must outlive the run
        for name, array in feeds.items():
            array = np.ascontiguousarray(array)
            keep.append(array)
            b.bind_input(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
        for name, array in outputs.items():
            b.bind_output(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)
        self.session.run_with_iobinding(b)

    def close(self) -> None:
        self.session = None
        self.binding = None
