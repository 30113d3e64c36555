"""Graph runners behind one interface: ONNX Runtime (CPU/CUDA) and TensorRT."""
from __future__ import annotations

import os

from ..device import HostMemory, Memory
from ..errors import VispecError
from ..specs import GraphSpec
from .base import GraphRunner

BACKENDS = ("ort", "ort-cuda", "tensorrt")


def make_runner(backend: str, path: str | os.PathLike, spec: GraphSpec,
                threads: int | None = None, memory: Memory | None = None,
                keep_spinning: bool = False) -> GraphRunner:
    """A runner of ``backend`` for the graph at ``path`` (ONNX file or TensorRT engine)
    whose tensors live in ``memory`` (its GPU for CUDA backends; host arrays it binds count
    in ``memory.traffic``); by default the backend's own (``default_memory``).
    ``keep_spinning``: ONNX Runtime's pool spins on between runs (``OrtRunner``)."""
    check_backend(backend)
    if backend in ("ort", "ort-cuda"):
        from .ort import CPU, CUDA, OrtRunner
        providers = [CUDA, CPU] if backend == "ort-cuda" else [CPU]
        return OrtRunner(path, spec, providers=providers, threads=threads, memory=memory,
                         keep_spinning=keep_spinning)
    from .tensorrt import TrtRunner
    return TrtRunner(path, spec, memory=memory)


def default_memory(backend: str, device_id: int = 0) -> Memory:
    """Where ``backend`` keeps KV caches and step tensors: numpy for the CPU, one device
    allocation per buffer on GPU ``device_id`` for CUDA backends (``runtime.device``)."""
    check_backend(backend)
    if backend == "ort":
        return HostMemory()
    if backend == "ort-cuda":
        from .ort import ort_memory
        return ort_memory("cuda", device_id)
    from .cuda import cuda_memory
    return cuda_memory(device_id)


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise VispecError(f"unknown backend {backend!r}. Choose one of {BACKENDS}")


__all__ = ["BACKENDS", "GraphRunner", "default_memory", "make_runner"]
