"""The TensorRT runner: a clear error without TensorRT; parity with ONNX Runtime on a GPU."""
import subprocess
import sys

import numpy as np
import pytest
from tiny_block import SPEC, block_artifacts, feeds

from vispec.runtime.backends import make_runner
from vispec.runtime.backends.ort import OrtRunner
from vispec.runtime.backends.tensorrt import TensorRTMissingError


def test_module_imports_without_tensorrt_or_torch():
    code = ("import sys; sys.modules['tensorrt'] = None; "
            "import vispec.runtime.backends.tensorrt; assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_runner_without_tensorrt_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(TensorRTMissingError, match="JetPack.*--backend ort"):
        make_runner("tensorrt", tmp_path / "block.engine", SPEC)


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
