"""Graph runners behind one interface: ONNX Runtime (CPU/CUDA) and TensorRT."""
from __future__ import annotations

import os

from ..device import DeviceMemory, HostMemory, Traffic
from ..errors import VispecError
from ..specs import GraphSpec
from .base import GraphRunner

BACKENDS = ("ort", "ort-cuda", "tensorrt")


def make_runner(backend: str, path: str | os.PathLike, spec: GraphSpec,
                threads: int | None = None, traffic: Traffic | None = None,
                device_id: int = 0) -> GraphRunner:
    """A runner of ``backend`` for the graph at ``path`` (ONNX file or TensorRT engine) on
    GPU ``device_id`` (CUDA backends); host buffers it binds on a device add their bytes to
    ``traffic``."""
    check_backend(backend)
    if backend in ("ort", "ort-cuda"):
        from .ort import CPU, CUDA, OrtRunner
        providers = [CUDA, CPU] if backend == "ort-cuda" else [CPU]
        return OrtRunner(path, spec, providers=providers, threads=threads, traffic=traffic,
                         device_id=device_id)
    from .tensorrt import TrtRunner
    return TrtRunner(path, spec, traffic=traffic, device_id=device_id)


def default_memory(backend: str, device_id: int = 0) -> HostMemory | DeviceMemory:
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
