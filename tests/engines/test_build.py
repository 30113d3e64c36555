"""The engine builder up to the TensorRT call: config, plan, Q/DQ, output folder."""
import sys
from types import SimpleNamespace

import onnx
import pytest
from tiny_block import block_artifacts, feeds

from vispec.engines import build
from vispec.engines.build import (
    BuildConfig,
    build_engines,
    create_config,
    plan_build,
    precision_options,
)
from vispec.runtime.backends.tensorrt import TensorRTMissingError
from vispec.runtime.errors import VispecError
from vispec.runtime.manifest import Manifest


@pytest.fixture
def artifacts(tmp_path):
    return block_artifacts(tmp_path / "artifacts")


@pytest.fixture
def fake_tensorrt(monkeypatch):
    """TensorRT 10.3 'present'; ``build_engine`` writes the name and ops of its ONNX."""
    monkeypatch.setattr(build, "import_tensorrt", lambda: SimpleNamespace(__version__="10.3.0"))
    built = {}

    def fake_build(onnx_path, engine_path, plan, config):
        built[plan.name] = {n.op_type for n in onnx.load(str(onnx_path)).graph.node}
        engine_path.write_bytes(b"engine")

    monkeypatch.setattr(build, "build_engine", fake_build)
    return built


def test_config_is_validated():
    with pytest.raises(VispecError, match="precision 'int4'. Expected one of"):
        BuildConfig(precision="int4")
    with pytest.raises(VispecError, match="workspace 0 MiB"):
        BuildConfig(workspace_mib=0)
    with pytest.raises(VispecError, match="repeat"):
        BuildConfig(profiles=(("a", 8), ("a", None)))
    with pytest.raises(VispecError, match="last bound to be None"):
        BuildConfig(profiles=(("decode", 64),))


def test_from_cli(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one\n\ntwo\n")
    config = BuildConfig.from_cli("int8", 512, str(tmp_path / "cache"), "tree=16, decode=64,rest",
                                  str(prompts))
    assert config.profiles == (("tree", 16), ("decode", 64), ("rest", None))
    assert config.calibration_prompts == ("one", "two")
    assert config.timing_cache == tmp_path / "cache"
    assert BuildConfig.from_cli(profiles="").profiles == ()
    with pytest.raises(VispecError, match="not an integer"):
        BuildConfig.from_cli(profiles="decode=lots,prefill")


@pytest.mark.parametrize("precision,quantized,dtype,major,want", [
    ("fp16", False, "float32", 10, ("fp16", False, {"fp16": True})),
    ("fp32", False, "float32", 10, ("fp32", False, {})),
    ("int8", True, "float32", 10, ("int8", False, {"int8": True, "fp16": True})),
    ("int8", False, "float32", 10, ("fp16", False, {"fp16": True})),
    ("int8", True, "float32", 11, ("int8", True, {})),
    ("int8", False, "float16", 11, ("fp16", True, {})),
    ("fp16", False, "float16", 11, ("fp16", True, {})),
])
def test_precision_on_tensorrt_10_and_11(precision, quantized, dtype, major, want):
    assert precision_options(precision, quantized, dtype, major) == want


def test_tensorrt_11_refuses_fp16_of_a_float32_graph(artifacts):
    manifest = Manifest.load(artifacts)
    with pytest.raises(VispecError, match="strongly typed.*--dtype float16"):
        plan_build(manifest, artifacts, BuildConfig(precision="fp16"), "11.2.0")
    [plan] = plan_build(manifest, artifacts, BuildConfig(precision="fp32"), "11.2.0")
    assert plan.strongly_typed and plan.precision == "fp32"


def test_plan_and_polygraphy_config_without_tensorrt(artifacts, tmp_path):
    manifest = Manifest.load(artifacts)
    with pytest.raises(VispecError, match="int8 needs calibration data"):
        plan_build(manifest, artifacts, BuildConfig(precision="int8"), "10.3.0")
    with pytest.raises(VispecError, match="graphs \\['vision'\\] that the manifest lacks"):
        plan_build(manifest, artifacts, BuildConfig(precision="int8"), "10.3.0", ["vision"])
    config = BuildConfig(precision="int8", timing_cache=tmp_path / "timing.cache")
    [plan] = plan_build(manifest, artifacts, config, "10.3.0", ["block"])
    assert (plan.precision, list(plan.profiles)) == ("int8", ["decode", "prefill"])
    trt_config = create_config(plan, config)
    assert trt_config.int8 and trt_config.fp16 and len(trt_config.profiles) == 2
    assert trt_config.timing_cache_path == str(tmp_path / "timing.cache")


def test_missing_tensorrt_says_what_to_do_and_writes_nothing(artifacts, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    out = tmp_path / "engines"
    with pytest.raises(TensorRTMissingError, match="TensorRT is not available.*--backend ort"):
        build_engines(artifacts, out, BuildConfig())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifacts"]


def test_int8_build_writes_qdq_engines_and_manifest(artifacts, tmp_path, fake_tensorrt):
    out = tmp_path / "engines"
    calibration = {"block": [feeds(n, seed) for seed, n in enumerate((4, 16, 64))]}
    messages = []
    assert build_engines(artifacts, out, BuildConfig(precision="int8"), calibration=calibration,
                         progress=messages.append) == out
    assert {"QuantizeLinear", "DequantizeLinear"} <= fake_tensorrt["block"]
    manifest = Manifest.load(out)  # every file it names exists
    entry = manifest.graph("block")
    assert entry.file == "block.engine"
    assert entry.spec.meta == {"precision": "int8", "profiles": ["decode", "prefill"]}
    assert manifest.versions["tensorrt"] == "10.3.0"
    assert sorted(p.name for p in out.iterdir()) == ["block.engine", "manifest.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifacts", "engines"]
    assert "calibrating" in messages[0]


def test_failed_build_leaves_no_output(artifacts, tmp_path, fake_tensorrt, monkeypatch):
    def fail(*args):
        raise VispecError("TensorRT could not build")

    monkeypatch.setattr(build, "build_engine", fail)
    with pytest.raises(VispecError, match="could not build"):
        build_engines(artifacts, tmp_path / "engines", BuildConfig())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifacts"]


def test_target_int8_calibrates_its_lm_on_prompts(tiny_target, tmp_path, fake_tensorrt):
    _, artifacts = tiny_target("llava")
    out = build_engines(artifacts, tmp_path / "engines", BuildConfig(
        precision="int8", calibration_prompts=("Describe a boat.", "Name three colours.")))
    manifest = Manifest.load(out)
    assert {k: g.spec.meta.get("precision") for k, g in manifest.graphs.items()} == \
        {"embed": "fp16", "vision": "fp16", "lm": "int8", "argmax": "fp16"}
    assert "QuantizeLinear" in fake_tensorrt["lm"]
    assert "QuantizeLinear" not in fake_tensorrt["embed"]
    assert (out / "processor" / "config.json").is_file()
    assert list(manifest.graph("vision").spec.meta["profiles"]) == ["all"]
