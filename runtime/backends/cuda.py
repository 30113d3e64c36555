"""CUDA memory for the device-resident path: allocation, copies and streams through
``libcudart``.

Loaded with ctypes when a CUDA backend makes its memory (never at import): ONNX Runtime's
CUDA provider and TensorRT both link the CUDA runtime, so it is present wherever they run.
Both backends finish their stream before a run returns; our copies and fills go to the
legacy default stream, and are waited for (``synchronize``) before the next graph runs,
so a copy never races a graph. Every call first makes ``device_id`` the thread's current
device (cheap), so targets on two GPUs can alternate in one thread.
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
NO_DEVICE = 100  # cudaErrorNoDevice
MAX_PITCH_ATTRIBUTE = 11  # cudaDevAttrMaxPitch: the largest pitch cudaMemcpy2D accepts
_SONAMES = ("libcudart.so", "libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0",
            "cudart64_13.dll", "cudart64_12.dll", "cudart64_110.dll")
_RESTART = "the CUDA context is unusable after this: restart the process"
# cudaError_t codes (CUDA 11+) -> what to do; anything else gets the generic hint.
_HINTS = {
    1: "a bad size, pointer or pitch reached CUDA: a bug in the device path; report it "
       "with the command that raised it",
    2: "out of GPU memory: a smaller --max-len or fewer images, or free the GPU (nvidia-smi "
       "lists the processes holding it)",
    3: "CUDA could not initialise: check `nvidia-smi` and the driver installation",
    12: "a pitch beyond the device's limit: a bug in the device path; report it",
    17: "a pointer that is not device memory: a bug in the device path; report it",
    35: "the NVIDIA driver is missing or older than this CUDA runtime: install or update "
        "the driver, or the onnxruntime-gpu / TensorRT build for the driver's CUDA version",
    46: "the GPU is busy or in exclusive-process mode (nvidia-smi -q | grep 'Compute Mode')",
    NO_DEVICE: "no CUDA GPU is visible: check `nvidia-smi` and CUDA_VISIBLE_DEVICES, or use "
         "`--backend ort` on the CPU",
    101: "no GPU has this device_id: pick one that `nvidia-smi -L` lists (numbered after "
         "CUDA_VISIBLE_DEVICES)",
    209: "no kernel for this GPU's architecture in the installed build: install an "
         "onnxruntime-gpu / TensorRT build that supports it",
    214: f"an uncorrectable ECC memory error; {_RESTART} (and check the GPU)",
    400: "a CUDA stream or handle that was already freed: a bug in the device path; report it",
    700: f"a kernel read or wrote outside its memory; {_RESTART}",
    719: f"a kernel failed; {_RESTART}",
    803: "the NVIDIA driver and its kernel module differ: reboot or reload the driver",
}


class CudaError(VispecError):
    """A CUDA runtime call failed; ``code`` is its ``cudaError_t``."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def cuda_error(code: int, what: str, lib: ctypes.CDLL | None = None) -> CudaError:
    """The error for ``what`` failing with ``code``, named by ``lib``'s ``cudaGetErrorName``."""
    name = lib.cudaGetErrorName(code) if lib is not None else None
    named = f" ({name.decode(errors='replace')})" if name else ""
    hint = _HINTS.get(code, "check the GPU with nvidia-smi")
    return CudaError(f"CUDA {what} failed with error {code}{named}. Hint: {hint}", code)


def _candidates() -> list[str]:
    """Where libcudart may be: the loader's path, then pip's nvidia-* wheels and torch."""
    found = [ctypes.util.find_library("cudart") or "", *_SONAMES]
    for root in sys.path:
        for pattern in ("nvidia/cuda_runtime/lib/libcudart.so*", "nvidia/cu*/lib/libcudart.so*",
                        "torch/lib/libcudart*.so*", "tensorrt_libs/libcudart.so*"):
            found += sorted(glob.glob(os.path.join(root, pattern)))
    return [c for c in found if c]


def load_cudart() -> ctypes.CDLL:
    """The CUDA runtime library, or a :class:`VispecError` naming what was tried."""
    errors = []
    for name in _candidates():
        try:
            return ctypes.CDLL(name)
        except OSError as e:
            errors.append(str(e) if name in str(e) else f"{name}: {e}")
    raise VispecError(f"cannot load the CUDA runtime (libcudart) for device-resident buffers "
                      f"(tried: {'; '.join(errors[:6]) or 'nothing found'}"
                      f"{f'; and {len(errors) - 6} more' if len(errors) > 6 else ''}). "
                      f"Expected: the libcudart that onnxruntime-gpu / TensorRT link. Hint: "
                      f"install the CUDA runtime they were built for (e.g. `pip install "
                      f"nvidia-cuda-runtime-cu12`), add its folder to LD_LIBRARY_PATH, or use "
                      f"`--backend ort` on the CPU")


class CudaCopier(Copier):
    """``cudaMemset`` / ``cudaMemcpy2D`` / ``cudaMemcpy`` / streams on GPU ``device_id``."""

    def __init__(self, device_id: int = 0, lib: ctypes.CDLL | None = None):
        self.device_id = device_id
        self.lib = lib or load_cudart()
        size, ptr, c_int = ctypes.c_size_t, ctypes.c_void_p, ctypes.c_int
        self.lib.cudaSetDevice.argtypes = [c_int]
        self.lib.cudaGetErrorName.argtypes = [c_int]
        self.lib.cudaGetErrorName.restype = ctypes.c_char_p
        self.lib.cudaDeviceGetAttribute.argtypes = [ctypes.POINTER(c_int), c_int, c_int]
        self.lib.cudaMemset.argtypes = [ptr, c_int, size]
        self.lib.cudaMemcpy.argtypes = [ptr, ptr, size, c_int]
        self.lib.cudaMemcpy2D.argtypes = [ptr, size, ptr, size, size, size, c_int]
        self.lib.cudaMalloc.argtypes = [ctypes.POINTER(ptr), size]
        self.lib.cudaFree.argtypes = [ptr]
        self.lib.cudaDeviceSynchronize.argtypes = []
        self.lib.cudaStreamCreate.argtypes = [ctypes.POINTER(ptr)]
        self.lib.cudaStreamSynchronize.argtypes = [ptr]
        self.lib.cudaStreamDestroy.argtypes = [ptr]
        value = c_int()
        self.activate()
        self.check(self.lib.cudaDeviceGetAttribute(ctypes.byref(value), MAX_PITCH_ATTRIBUTE,
                                                    device_id), "cudaDeviceGetAttribute")
        self.max_pitch = value.value

    def check(self, status: int, what: str) -> None:
        if status != 0:
            raise cuda_error(status, what, self.lib)

    def activate(self) -> None:
        """Make ``device_id`` the calling thread's current device."""
        self.check(self.lib.cudaSetDevice(self.device_id), f"cudaSetDevice({self.device_id})")

    def zero(self, ptr, nbytes):
        self.activate()
        self.check(self.lib.cudaMemset(ptr, 0, nbytes), "cudaMemset")

    def copy_2d(self, dst, dpitch, src, spitch, width, height):
        """One ``cudaMemcpy2D``, or one ``cudaMemcpy`` per row where a pitch exceeds the
        device's limit (~2 GiB: a KV slab of a long context)."""
        self.activate()
        if max(dpitch, spitch) <= self.max_pitch:
            self.check(self.lib.cudaMemcpy2D(dst, dpitch, src, spitch, width, height, D2D),
                        "cudaMemcpy2D")
            return
        for row in range(height):
            self.check(self.lib.cudaMemcpy(dst + row * dpitch, src + row * spitch, width, D2D),
                        "cudaMemcpy")

    def to_host(self, out: np.ndarray, src):
        self.activate()
        self.check(self.lib.cudaMemcpy(out.ctypes.data, src, out.nbytes, D2H), "cudaMemcpy")

    def from_host(self, dst, array: np.ndarray):
        self.activate()
        self.check(self.lib.cudaMemcpy(dst, array.ctypes.data, array.nbytes, H2D),
                    "cudaMemcpy")

    def synchronize(self):
        self.activate()
        self.check(self.lib.cudaDeviceSynchronize(), "cudaDeviceSynchronize")

    def malloc(self, nbytes: int) -> tuple[int, "CudaAllocation"]:
        self.activate()
        ptr = ctypes.c_void_p()
        self.check(self.lib.cudaMalloc(ctypes.byref(ptr), nbytes), f"cudaMalloc({nbytes})")
        return ptr.value, CudaAllocation(self, ptr.value)

    def free(self, ptr: int) -> None:
        self.activate()
        self.check(self.lib.cudaFree(ptr), "cudaFree")

    def stream(self) -> "CudaStream":
        """A new stream on this device (``cudaStreamCreate``: it waits for the legacy
        default stream, where our copies go)."""
        self.activate()
        ptr = ctypes.c_void_p()
        self.check(self.lib.cudaStreamCreate(ctypes.byref(ptr)), "cudaStreamCreate")
        return CudaStream(self, ptr.value)


class CudaAllocation:
    """One ``cudaMalloc`` pointer: freed by ``free()`` or when collected."""

    def __init__(self, copier: CudaCopier, ptr: int):
        self.copier, self.ptr = copier, ptr

    def free(self) -> None:
        if self.ptr:
            ptr, self.ptr = self.ptr, 0
            self.copier.free(ptr)

    def __del__(self):
        try:
            self.free()
        except Exception:  # at interpreter exit or after a fault: nothing left to free
            pass


class CudaStream:
    """A CUDA stream: ``ptr`` for the backends, ``synchronize``, ``free``."""

    def __init__(self, copier: CudaCopier, ptr: int):
        self.copier, self.ptr = copier, ptr

    def synchronize(self) -> None:
        self.copier.activate()
        self.copier.check(self.copier.lib.cudaStreamSynchronize(self.ptr),
                           "cudaStreamSynchronize")

    def free(self) -> None:
        if self.ptr:
            ptr, self.ptr = self.ptr, None
            self.copier.activate()
            self.copier.check(self.copier.lib.cudaStreamDestroy(ptr), "cudaStreamDestroy")


def cuda_memory(device_id: int = 0) -> DeviceMemory:
    """Device memory from ``cudaMalloc`` on GPU ``device_id`` (the TensorRT backend's)."""
    copier = CudaCopier(device_id)
    return DeviceMemory("cuda", copier.malloc, copier, device_id)


def _cudart() -> ctypes.CDLL:
    lib = load_cudart()
    lib.cudaGetErrorName.restype = ctypes.c_char_p
    return lib


def device_count() -> int:
    """How many CUDA GPUs this process sees; a :class:`CudaError` when the driver cannot
    say (none installed, or too old)."""
    lib, count = _cudart(), ctypes.c_int()
    status = lib.cudaGetDeviceCount(ctypes.byref(count))
    if status not in (0, NO_DEVICE):
        raise cuda_error(status, "cudaGetDeviceCount", lib)
    return count.value


def device_name(device_id: int = 0) -> str:
    """The GPU's name (``cudaDeviceProp.name``, the struct's first field)."""
    lib, props = _cudart(), ctypes.create_string_buffer(1 << 14)  # > any cudaDeviceProp
    get = getattr(lib, "cudaGetDeviceProperties_v2", None) or lib.cudaGetDeviceProperties
    status = get(props, device_id)
    if status != 0:
        raise cuda_error(status, f"cudaGetDeviceProperties({device_id})", lib)
    return props.raw[:256].split(b"\0", 1)[0].decode(errors="replace")
