"""The CUDA-side logic of the device path, checked without a GPU: ``CudaCopier`` over a
host emulation of the libcudart calls it makes (real memory, real copies), error hints,
the library search, ONNX Runtime's CUDA provider options and the wheel-shadowing check."""
import ctypes
from types import SimpleNamespace

import numpy as np
import pytest

from vispec.runtime.backends import cuda, ort
from vispec.runtime.backends.base import GraphRunner
from vispec.runtime.backends.cuda import CudaCopier, CudaError, cuda_error
from vispec.runtime.device import DeviceMemory
from vispec.runtime.errors import ShapeError, VispecError
from vispec.runtime.kv_cache import KVCache
from vispec.runtime.specs import GraphSpec, TensorSpec

NAMES = {2: b"cudaErrorMemoryAllocation", 101: b"cudaErrorInvalidDevice"}


class HostCudart(SimpleNamespace):
    """The libcudart functions ``CudaCopier`` calls, on host memory: "device" pointers are
    ctypes buffers, copies are ``memmove``. Each call is recorded; ``fail`` maps a function
    name to the error code it returns."""

    def __init__(self, max_pitch: int = 2**31 - 1, fail: dict | None = None):
        super().__init__()
        self.calls, self.buffers, fail = [], {}, fail or {}

        def memcpy(dst, src, n, kind):
            ctypes.memmove(dst, src, n)

        def memcpy_2d(dst, dpitch, src, spitch, width, height, kind):
            for row in range(height):
                ctypes.memmove(dst + row * dpitch, src + row * spitch, width)

        def malloc(out, n):
            buffer = ctypes.create_string_buffer(n)
            self.buffers[ctypes.addressof(buffer)] = buffer
            out._obj.value = ctypes.addressof(buffer)

        functions = {
            "cudaSetDevice": lambda device: None,
            "cudaDeviceGetAttribute": lambda out, attr, device: setattr(out._obj, "value",
                                                                        max_pitch),
            "cudaMemset": lambda ptr, value, n: ctypes.memset(ptr, value, n),
            "cudaMemcpy": memcpy, "cudaMemcpy2D": memcpy_2d, "cudaMalloc": malloc,
            "cudaFree": lambda ptr: self.buffers.pop(ptr),
            "cudaDeviceSynchronize": lambda: None,
            "cudaStreamCreate": lambda out: setattr(out._obj, "value", 1),
            "cudaStreamSynchronize": lambda stream: None,
            "cudaStreamDestroy": lambda stream: None,
        }
        for name, function in functions.items():
            setattr(self, name, self._recorded(name, function, fail.get(name, 0)))
        self.cudaGetErrorName = lambda code: NAMES.get(code)

    def _recorded(self, name, function, code):
        def call(*args):
            self.calls.append((name, args))
            if code:
                return code
            function(*args)
            return 0
        return call

    def called(self, name: str) -> list:
        return [args for n, args in self.calls if n == name]


def memory_on(lib: HostCudart, device_id: int = 0) -> DeviceMemory:
    copier = CudaCopier(device_id, lib)
    return DeviceMemory("cuda", copier.malloc, copier, device_id)


@pytest.mark.parametrize("max_pitch,strided", [(2**31 - 1, True), (511, False)])
def test_compaction_splits_rows_past_the_device_max_pitch(max_pitch, strided):
    """A slab row pitch past cudaDevAttrMaxPitch (~2 GiB at long contexts) makes
    cudaMemcpy2D fail: the copier then copies row by row; the cache ends up the same."""
    lib = HostCudart(max_pitch)
    data = np.random.default_rng(0).standard_normal((3, 2, 16, 2, 4)).astype(np.float32)
    host = KVCache(3, 2, 4, 16, np.float32)  # pitch 16 rows x 32 bytes = 512
    device = KVCache(3, 2, 4, 16, np.float32, memory_on(lib, 0))
    host.buffer[...] = data
    device.memory.from_host(device.buffer, data)
    for cache in (host, device):
        cache.commit(11)
        cache.compact(np.array([4, 6, 7, 10]), 3)
    np.testing.assert_array_equal(device.to_host(), host.buffer)
    assert bool(lib.called("cudaMemcpy2D")) == strided
    assert len(lib.called("cudaMemcpy")) == 2 + (0 if strided else 4 * 3 * 2)  # + in, out


def test_every_call_runs_on_the_chosen_device_and_close_frees_it():
    lib = HostCudart()
    memory = memory_on(lib, device_id=3)
    memory.empty((4, 4), np.float32)
    memory.scratch("logits", (1, 5), np.float32)
    memory.copier.stream().free()
    assert {args for args in lib.called("cudaSetDevice")} == {(3,)}
    names = [name for name, _ in lib.calls]
    assert all(names[i - 1] == "cudaSetDevice" for i, name in enumerate(names)
               if name != "cudaSetDevice"), names
    assert len(lib.buffers) == 2
    memory.close()
    assert lib.buffers == {}


@pytest.mark.parametrize("function,code,hint", [
    ("cudaMalloc", 2, "out of GPU memory.*--max-len"),
    ("cudaSetDevice", 101, "no GPU has this device_id.*nvidia-smi -L"),
    ("cudaMemcpy2D", 700, "restart the process"),
])
def test_a_failing_call_names_the_error_and_the_matching_hint(function, code, hint):
    lib = HostCudart(fail={function: code})
    with pytest.raises(CudaError, match=hint) as raised:
        memory = memory_on(lib)
        cache = KVCache(1, 2, 4, 8, np.float32, memory)
        cache.commit(4)
        cache.compact(np.array([3]), 1)
    assert raised.value.code == code
    assert NAMES.get(code, b"").decode() in str(raised.value)


def test_only_out_of_memory_gets_the_out_of_memory_hint():
    assert "out of GPU memory" in str(cuda_error(2, "cudaMalloc(8)"))
    for code in (1, 35, 100, 101, 700, 999):
        assert "out of GPU memory" not in str(cuda_error(code, "cudaMemcpy")), code


def test_missing_cudart_says_what_was_tried(monkeypatch):
    monkeypatch.setattr(cuda, "_candidates", lambda: ["/nowhere/libcudart.so.99"])
    with pytest.raises(VispecError, match=r"tried: .*/nowhere/libcudart\.so\.99.*LD_LIBRARY_PATH"):
        cuda.load_cudart()


def test_cuda_provider_gets_the_device_and_no_tf32():
    providers = ort.provider_options([ort.CUDA, ort.CPU], device_id=1)
    assert providers == [(ort.CUDA, {"device_id": "1", "use_tf32": "0"}), ort.CPU]


def test_cpu_wheel_shadowing_the_gpu_wheel_is_named(monkeypatch):
    def installed(*names):
        dists = [SimpleNamespace(metadata={"Name": n}) for n in (*names, "numpy")]
        monkeypatch.setattr(ort.importlib.metadata, "distributions", lambda: dists)

    installed("onnxruntime", "onnxruntime_gpu")
    assert "both installed" in ort.shadowed_gpu_wheel()
    installed("onnxruntime")
    assert ort.shadowed_gpu_wheel() is None
    installed("onnxruntime", "onnxruntime-gpu")
    with pytest.raises(VispecError, match="shadows the GPU one.*pip uninstall"):
        ort.OrtRunner("unused.onnx", None, providers=[ort.CUDA, ort.CPU])


def test_output_buffers_of_another_dtype_are_refused():
    spec = GraphSpec("g", inputs=(TensorSpec("x", "float32", (2,)),),
                     outputs=(TensorSpec("y", "float16", (2,)),), dims=())
    with pytest.raises(ShapeError, match="output buffer 'y' is float32.*Expected: a contiguous "
                                         "float16"):
        GraphRunner(spec).infer({"x": np.zeros(2, np.float32)}, {"y": np.zeros(2, np.float32)})
