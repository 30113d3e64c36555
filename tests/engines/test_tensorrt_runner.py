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
def test_engine_matches_onnxruntime(tmp_path, precision, tolerance):
    trt = pytest.importorskip("tensorrt")
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
def test_engine_binds_device_tensors_by_address(tmp_path):
    """Device-resident IO (a device KV cache's views): bound by pointer, nothing copied."""
    pytest.importorskip("tensorrt")
    from vispec.engines.build import BuildConfig, build_engines
    from vispec.runtime.backends.cuda import cuda_memory
    from vispec.runtime.backends.tensorrt import TrtRunner

    artifacts = block_artifacts(tmp_path / "artifacts")
    out = build_engines(artifacts, tmp_path / "engines", BuildConfig(precision="fp32"))
    memory, feed = cuda_memory(), feeds(16, seed=3)
    on_device = {}
    for name, array in feed.items():
        on_device[name] = memory.empty(array.shape, array.dtype)
        memory.from_host(on_device[name], array)
    y = memory.empty((1, 16, 32), np.float32)
    with TrtRunner(out / "block.engine", SPEC) as runner:
        runner.infer(on_device, {"y": y})
        assert runner.traffic.total == 0
    want = OrtRunner(artifacts / "block.onnx", SPEC).infer(feed)["y"]
    np.testing.assert_allclose(memory.to_host(y), want, atol=1e-4)
