"""CUDA memory for the device-resident path: allocation and copies through ``libcudart``.

Loaded with ctypes when a CUDA backend makes its memory (never at import): ONNX Runtime's
CUDA provider and TensorRT both link the CUDA runtime, so it is present wherever they run.
Both backends finish their stream before a run returns; our copies and fills go to the
legacy default stream, and device-to-device ones (asynchronous there) are waited for
(``synchronize``) before the next graph runs, so a copy never races a graph.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys

import numpy as np

from ..device import Copier, DeviceMemory
from ..errors import VispecError

H2D, D2H, D2D = 1, 2, 3  # cudaMemcpyKind
_SONAMES = ("libcudart.so", "libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0",
            "cudart64_13.dll", "cudart64_12.dll", "cudart64_110.dll")


def _candidates() -> list[str]:
    """Where libcudart may be: the loader's path, then pip's nvidia-* wheels and torch."""
    found = [ctypes.util.find_library("cudart") or "", *_SONAMES]
    for root in sys.path:
        for pattern in ("nvidia/cuda_runtime/lib/libcudart.so*", "nvidia/cu*/lib/libcudart.so*",
                        "torch/lib/libcudart*.so*", "tensorrt_libs/libcudart.so*"):
            found += sorted(glob.glob(os.path.join(root, pattern)))
    return [c for c in found if c]


def load_cudart() -> ctypes.CDLL:
    """The CUDA runtime library, or a :class:`VispecError` saying what to do."""
    errors = []
    for name in _candidates():
        try:
            return ctypes.CDLL(name)
        except OSError as e:
            errors.append(f"{name}: {e}")
    raise VispecError("cannot load the CUDA runtime (libcudart) for device-resident buffers. "
                      "Hint: install the CUDA runtime that your onnxruntime-gpu / TensorRT "
                      "was built for (e.g. `pip install nvidia-cuda-runtime-cu12`), or use "
                      "`--backend ort` on the CPU")


class CudaCopier(Copier):
    """``cudaMemset`` / ``cudaMemcpy2D`` / ``cudaMemcpy`` on the current device."""

    def __init__(self, lib: ctypes.CDLL | None = None):
        self.lib = lib or load_cudart()
        size, ptr = ctypes.c_size_t, ctypes.c_void_p
        self.lib.cudaMemset.argtypes = [ptr, ctypes.c_int, size]
        self.lib.cudaMemcpy.argtypes = [ptr, ptr, size, ctypes.c_int]
        self.lib.cudaMemcpy2D.argtypes = [ptr, size, ptr, size, size, size, ctypes.c_int]
        self.lib.cudaMalloc.argtypes = [ctypes.POINTER(ptr), size]
        self.lib.cudaFree.argtypes = [ptr]
        self.lib.cudaDeviceSynchronize.argtypes = []

    def _check(self, status: int, what: str) -> None:
        if status != 0:
            raise VispecError(f"CUDA {what} failed with error {status}. Hint: check the GPU "
                              f"with nvidia-smi; out of memory means a smaller --max-len")

    def zero(self, ptr, nbytes):
        self._check(self.lib.cudaMemset(ptr, 0, nbytes), "cudaMemset")

    def copy_2d(self, dst, dpitch, src, spitch, width, height):
        self._check(self.lib.cudaMemcpy2D(dst, dpitch, src, spitch, width, height, D2D),
                    "cudaMemcpy2D")

    def to_host(self, out: np.ndarray, src):
        self._check(self.lib.cudaMemcpy(out.ctypes.data, src, out.nbytes, D2H), "cudaMemcpy")

    def from_host(self, dst, array: np.ndarray):
        self._check(self.lib.cudaMemcpy(dst, array.ctypes.data, array.nbytes, H2D),
                    "cudaMemcpy")

    def synchronize(self):
        self._check(self.lib.cudaDeviceSynchronize(), "cudaDeviceSynchronize")

    def malloc(self, nbytes: int) -> tuple[int, "CudaAllocation"]:
        ptr = ctypes.c_void_p()
        self._check(self.lib.cudaMalloc(ctypes.byref(ptr), nbytes), f"cudaMalloc({nbytes})")
        return ptr.value, CudaAllocation(self.lib, ptr.value)


class CudaAllocation:
    """Frees its ``cudaMalloc`` pointer when collected."""

    def __init__(self, lib: ctypes.CDLL, ptr: int):
        self.lib, self.ptr = lib, ptr

    def __del__(self):
        if self.ptr:
            self.lib.cudaFree(self.ptr)
            self.ptr = 0


def cuda_memory() -> DeviceMemory:
    """Device memory from ``cudaMalloc`` (the TensorRT backend's)."""
    copier = CudaCopier()
    return DeviceMemory("cuda", copier.malloc, copier)
