"""Graph runners behind one interface: ONNX Runtime (CPU/CUDA) and TensorRT."""
from __future__ import annotations

import os

from ..errors import VispecError
from ..specs import GraphSpec
from .base import GraphRunner

BACKENDS = ("ort", "ort-cuda", "tensorrt")


def make_runner(backend: str, path: str | os.PathLike, spec: GraphSpec,
                threads: int | None = None) -> GraphRunner:
    """A runner of ``backend`` for the graph at ``path`` (ONNX file or TensorRT engine)."""
    if backend in ("ort", "ort-cuda"):
        from .ort import CPU, CUDA, OrtRunner
        providers = [CUDA, CPU] if backend == "ort-cuda" else [CPU]
        return OrtRunner(path, spec, providers=providers, threads=threads)
    if backend == "tensorrt":
        from .tensorrt import TrtRunner
        return TrtRunner(path, spec)
    raise VispecError(f"unknown backend {backend!r}. Choose one of {BACKENDS}")


__all__ = ["BACKENDS", "GraphRunner", "make_runner"]
