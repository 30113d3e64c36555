"""The TensorRT runner: a clear error without TensorRT; its binding logic on an emulated
execution context (CPU); parity with ONNX Runtime on a GPU."""
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from tiny_block import SPEC, block_artifacts, feeds

from vispec.runtime.backends import make_runner
from vispec.runtime.backends.base import GraphRunner
from vispec.runtime.backends.ort import OrtRunner, ort_memory
from vispec.runtime.backends.tensorrt import TensorRTMissingError, TrtRunner
from vispec.runtime.device import ALIGNMENT, AlignedIO, DeviceTensor, HostMemory
from vispec.runtime.errors import VispecError


def test_module_imports_without_tensorrt_or_torch():
    code = ("import sys; sys.modules['tensorrt'] = None; "
            "import vispec.runtime.backends.tensorrt; assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_runner_without_tensorrt_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(TensorRTMissingError, match="JetPack.*--backend ort"):
        make_runner("tensorrt", tmp_path / "block.engine", SPEC)


def test_runner_takes_cuda_memory_only(tmp_path, monkeypatch):
    """The runner's buffers, copies and stream come from the memory it is given (the
    target's, one CUDA layer): host memory is refused before any engine is read."""
    monkeypatch.setitem(sys.modules, "tensorrt", SimpleNamespace(__version__="10.3.0"))
    with pytest.raises(VispecError, match="binds CUDA device memory, not 'host' memory"):
        make_runner("tensorrt", tmp_path / "block.engine", SPEC, memory=HostMemory())


def test_engine_dtypes_are_checked_against_the_spec_by_tensorrt_nptype(monkeypatch):
    """The engine's tensor dtypes are read through ``tensorrt.nptype`` (polygraphy is only
    the engine builder's); a type numpy lacks (bfloat16) is a mismatch, not a crash."""
    monkeypatch.setitem(sys.modules, "polygraphy", None)
    types = {name: SimpleNamespace(name=name) for name in ("FLOAT", "HALF", "BF16")}
    numpy_types = {"FLOAT": np.float32, "HALF": np.float16}

    def nptype(dtype):
        if dtype.name not in numpy_types:
            raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype.")
        return numpy_types[dtype.name]

    trt = SimpleNamespace(nptype=nptype)
    runner = TrtRunner.__new__(TrtRunner)
    GraphRunner.__init__(runner, SPEC)
    for y_type, problem in (("FLOAT", None), ("HALF", "HALF"), ("BF16", "BF16")):
        dtypes = {"x": types["FLOAT"], "y": types[y_type]}
        runner.engine = SimpleNamespace(num_io_tensors=2, get_tensor_name=["x", "y"].__getitem__,
                                        get_tensor_dtype=dtypes.__getitem__)
        if problem is None:
            runner._check_io(trt)
            continue
        with pytest.raises(VispecError, match=f"tensor 'y' \\| engine dtype {problem}. "
                                              f"Expected: float32"):
            runner._check_io(trt)


class EmulatedContext:
    """TensorRT's name-based execution-context calls over an ONNX Runtime session on the
    CPU: the runner's profile, shape, alignment and address handling run without TensorRT.
    Addresses TensorRT would refuse (null, not 256-byte aligned, ``refuse``d names) are
    refused, as are profiles past ``profiles``; ``execute_async_v3`` runs the graph on the
    bound addresses."""

    def __init__(self, onnx_path, profiles=2, refuse=()):
        self.runner = OrtRunner(onnx_path, SPEC)
        self.profiles, self.refuse = profiles, set(refuse)
        self.shapes, self.addresses, self.switched = {}, {}, []

    def set_optimization_profile_async(self, index, stream):
        self.switched.append(index)
        return index < self.profiles

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        return self.shapes["x"]  # y is shaped like x

    def set_tensor_address(self, name, ptr):
        if name in self.refuse or not ptr or ptr % ALIGNMENT:
            return False
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream):
        x, y = (DeviceTensor(self.addresses[n], self.shapes["x"], np.dtype(np.float32), "cpu")
                for n in "xy")
        self.runner.infer({"x": x}, {"y": y})
        return True


def emulated_runner(context: EmulatedContext) -> TrtRunner:
    """A TrtRunner whose engine is ``context`` and whose device is ORT CPU memory."""
    runner = TrtRunner.__new__(TrtRunner)
    GraphRunner.__init__(runner, SPEC)
    runner.memory = ort_memory("cpu")
    runner.io, runner.context = AlignedIO(runner.memory), context
    runner.stream = SimpleNamespace(ptr=1, synchronize=lambda: None)
    runner.ranges = [{"x": ((1, 1, 32), (1, 8, 32), (1, 64, 32))},
                     {"x": ((1, 65, 32), (1, 100, 32), (1, 128, 32))}]
    runner.profile = 0
    return runner


@pytest.fixture(scope="module")
def block_onnx(tmp_path_factory):
    return block_artifacts(tmp_path_factory.mktemp("block") / "artifacts") / "block.onnx"


def test_runner_flow_on_an_emulated_context(block_onnx):
    """Host and device IO, aligned and misaligned (a view 128 bytes into its allocation,
    as an odd row of a tiny KV cache), across a profile switch: what the graph computes
    lands in the caller's buffers, and only host IO crosses."""
    context = EmulatedContext(block_onnx)
    runner, memory = emulated_runner(context), ort_memory("cpu")
    reference = OrtRunner(block_onnx, SPEC)
    for new, offset in ((4, 0), (100, 128), (1, 128)):
        feed = feeds(new, seed=new)
        want = reference.infer(feed)["y"]
        mine = {"y": np.empty((1, new, 32), np.float32)}
        runner.infer(feed, mine)  # host in, host out
        np.testing.assert_allclose(mine["y"], want, atol=1e-6)
        x, y = (memory.empty((offset + feed["x"].nbytes,), np.uint8).view(
            offset, (1, new, 32), np.float32) for _ in "xy")
        memory.from_host(x, feed["x"])
        before, staged = runner.traffic.snapshot(), runner.io.staged
        runner.infer({"x": x}, {"y": y})
        assert runner.traffic.since(before).total == 0
        assert runner.io.staged - staged == (2 * feed["x"].nbytes if offset else 0)
        np.testing.assert_allclose(memory.to_host(y), want, atol=1e-6)
    assert context.switched == [1, 0]  # switched only when the shapes needed another profile


@pytest.mark.parametrize("refuse,profiles,match", [
    ({"y"}, 2, "tensor 'y' \\| address 0x[0-9a-f]+ refused by TensorRT"),
    (set(), 1, "TensorRT refused optimization profile 1 of 2"),
])
def test_refusals_raise_instead_of_keeping_a_stale_binding(block_onnx, refuse, profiles, match):
    runner = emulated_runner(EmulatedContext(block_onnx, profiles, refuse))
    with pytest.raises(VispecError, match=match):
        runner.infer(feeds(100, seed=0), {"y": np.empty((1, 100, 32), np.float32)})


@pytest.mark.gpu
@pytest.mark.parametrize("precision,tolerance", [("fp32", 1e-4), ("fp16", 2e-2), ("int8", 0.1)])
def test_engine_matches_onnxruntime(tensorrt_gpu, tmp_path, precision, tolerance):
    import tensorrt as trt
    if precision == "fp16" and int(trt.__version__.split(".")[0]) >= 11:
        pytest.skip("TensorRT 11 takes fp16 from the graph: this export is float32")
    from vispec.engines.build import BuildConfig, build_engines
    from vispec.runtime.backends.tensorrt import TrtRunner

    artifacts = block_artifacts(tmp_path / "artifacts")
    calibration = {"block": [feeds(n, seed) for seed, n in enumerate((4, 16, 64, 128))]}
    out = build_engines(artifacts, tmp_path / "engines", BuildConfig(precision=precision),
                        calibration=calibration)
    reference = OrtRunner(artifacts / "block.onnx", SPEC)
    with TrtRunner(out / "block.engine", SPEC) as runner:
        assert runner.engine.num_optimization_profiles == 2
        for new, profile in ((4, 0), (100, 1), (1, 0)):  # decode, prefill, decode again
            feed = feeds(new, seed=new)
            mine = {"y": np.empty((1, new, 32), np.float32)}  # caller-owned, written in place
            runner.infer(feed, mine)
            assert runner.profile == profile
            want = reference.infer(feed)["y"]
            assert np.abs(mine["y"] - want).max() < tolerance * max(1.0, np.abs(want).max())


@pytest.mark.gpu
def test_engine_binds_device_tensors_by_address(tensorrt_gpu, tmp_path):
    """Device-resident IO (a device KV cache's views) is bound by pointer: nothing crosses
    to the host. TensorRT needs 256-byte aligned addresses: a view 128 bytes into its
    allocation (an odd row of a tiny cache) is staged through an aligned buffer on the
    device, and the result is the same."""
    from vispec.engines.build import BuildConfig, build_engines
    from vispec.runtime.backends.cuda import cuda_memory
    from vispec.runtime.backends.tensorrt import TrtRunner

    artifacts = block_artifacts(tmp_path / "artifacts")
    out = build_engines(artifacts, tmp_path / "engines", BuildConfig(precision="fp32"))
    feed = feeds(16, seed=3)
    want = OrtRunner(artifacts / "block.onnx", SPEC).infer(feed)["y"]
    memory, nbytes = cuda_memory(), feed["x"].nbytes
    with TrtRunner(out / "block.engine", SPEC) as runner:
        for offset in (0, 128):
            x, y = (memory.empty((offset + nbytes,), np.uint8).view(offset, (1, 16, 32),
                                                                   np.float32) for _ in "xy")
            memory.from_host(x, feed["x"])
            staged = runner.io.staged
            runner.infer({"x": x}, {"y": y})
            assert runner.traffic.total == 0
            assert runner.io.staged - staged == (2 * nbytes if offset else 0)
            np.testing.assert_allclose(memory.to_host(y), want, atol=1e-4)
    memory.close()
