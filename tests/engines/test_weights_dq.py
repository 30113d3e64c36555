"""Quantized target weights for TensorRT: the INT4 DequantizeLinear rewrite (run here with
ONNX Runtime) and what ``build`` accepts or refuses."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from test_build import fake_tensorrt  # noqa: F401  (fixture)

from vispec.engines.build import BuildConfig, build_engines, plan_build
from vispec.engines.weights_dq import to_dequantize_linear
from vispec.exporter.export import export_target
from vispec.exporter.onnx_io import example_feeds
from vispec.runtime.errors import VispecError
from vispec.runtime.manifest import Manifest
from vispec.runtime.specs import INPUT_IDS, NEW, PAST


@pytest.fixture(scope="module")
def exports(tiny_target, tmp_path_factory):
    """``exports(weights, block) -> artifacts`` of the tiny LLaVA, head and embedding quantized."""
    made = {}

    def get(weights, block):
        if (weights, block) not in made:
            out = tmp_path_factory.mktemp(f"{weights}-{block}") / "artifacts"
            export_target(tiny_target("llava")[0], out, max_len=256, weights=weights,
                          weights_block=block, weights_exclude=())
            made[weights, block] = out
        return made[weights, block]

    return get


def _session(model, optimize: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model if isinstance(model, str) else model.SerializeToString(),
                                options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("graph", ["lm", "embed"])
def test_dequantize_linear_form_computes_the_same_graph(exports, tmp_path, graph):
    """Op by op (no fusion), the standard-op form equals the contrib-op graph evaluated with
    float activations (``accuracy_level`` 0), output for output."""
    artifacts = exports("int4", 64)
    spec = Manifest.load(artifacts).graph(graph).spec
    rewritten = to_dequantize_linear(artifacts / f"{graph}.onnx", tmp_path / f"{graph}.onnx")
    model = onnx.load(str(rewritten))
    ops = {n.op_type for n in model.graph.node}
    assert not ops & {"MatMulNBits", "GatherBlockQuantized"}
    assert {o.domain: o.version for o in model.opset_import} == {"": 21}
    if graph == "lm":
        dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
        weights = {t.name: t for t in model.graph.initializer}
        assert dq and all(weights[n.input[0]].data_type == onnx.TensorProto.INT4 for n in dq)
    reference = onnx.load(str(artifacts / f"{graph}.onnx"))
    for node in reference.graph.node:
        for attr in node.attribute:
            if attr.name == "accuracy_level":
                attr.i = 0
    ids = {INPUT_IDS: np.array([[1, 5, 9, 100, 3]])} if graph == "embed" else {}
    feeds = example_feeds(spec, {NEW: 5, PAST: 7}, np.random.default_rng(0), **ids)
    want = _session(reference, optimize=False).run(None, feeds)
    got = _session(str(rewritten), optimize=False).run(None, feeds)
    for w, g in zip(want, got):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * np.abs(w).max())


def test_build_takes_int4_in_blocks_of_64_as_dequantize_linear(exports, tmp_path,
                                                               fake_tensorrt):  # noqa: F811
    artifacts = exports("int4", 64)
    plans = {p.name: p for p in plan_build(Manifest.load(artifacts), artifacts,
                                           BuildConfig(precision="fp16"), "10.3.0")}
    assert plans["lm"].precision == "int4" and plans["vision"].precision == "fp16"
    out = build_engines(artifacts, tmp_path / "engines", BuildConfig(precision="fp16"))
    assert "DequantizeLinear" in fake_tensorrt["lm"] and "MatMulNBits" not in fake_tensorrt["lm"]
    assert fake_tensorrt["embed"] == {"Gather"}
    built = Manifest.load(out)
    assert built.model["weights"] == "int4" and built.versions["tensorrt"] == "10.3.0"
    assert built.graph("lm").spec.meta["precision"] == "int4"
    assert not (out / ".qdq").exists()


@pytest.mark.parametrize("weights,block,config,message", [
    ("int4", 32, BuildConfig(precision="fp16"), "blocks of 64 or 128.*Hint:.*--weights-block 64"),
    ("int8", 32, BuildConfig(precision="fp16"), "8-bit weights.*TensorRT takes INT4"),
    ("int4", 64, BuildConfig(precision="int8"), "Hint: build --precision fp16 or fp32"),
])
def test_build_refuses_what_tensorrt_cannot_take(exports, weights, block, config, message):
    artifacts = exports(weights, block)
    with pytest.raises(VispecError, match=message):
        plan_build(Manifest.load(artifacts), artifacts, config, "10.3.0")


@pytest.mark.parametrize("head", [{"weights_exclude": ("head", "embed")},
                                  {"weights_head": "int4"}], ids=["head-float", "head-int4"])
def test_build_maps_minmax_int4_with_the_head_float_or_4_bit(tiny_target, tmp_path, head,
                                                             fake_tensorrt):  # noqa: F811
    """``--weights-method minmax``: its zero points become the symmetric INT4 product plus
    ``d (8 - z)`` times the block sums (standard ops), so the DequantizeLinear form computes
    the same graph; its int8 head is refused with the ways out (a float or a 4-bit head)."""
    model_dir = tiny_target("llava")[0]
    head_int8 = tmp_path / "head-int8"
    export_target(model_dir, head_int8, max_len=256, weights="int4", weights_block=64,
                  weights_method="minmax")
    with pytest.raises(VispecError, match="8-bit.*minmax.*--weights-head int4, or "
                                          "--weights-exclude head"):
        plan_build(Manifest.load(head_int8), head_int8, BuildConfig(precision="fp16"), "10.3.0")
    artifacts = tmp_path / "artifacts"
    export_target(model_dir, artifacts, max_len=256, weights="int4", weights_block=64,
                  weights_method="minmax", **head)
    plans = {p.name: p for p in plan_build(Manifest.load(artifacts), artifacts,
                                           BuildConfig(precision="fp16"), "10.3.0")}
    assert plans["lm"].precision == "int4"
    build_engines(artifacts, tmp_path / "engines", BuildConfig(precision="fp16"))
    assert "DequantizeLinear" in fake_tensorrt["lm"] and "MatMulNBits" not in fake_tensorrt["lm"]
    reference = onnx.load(str(artifacts / "lm.onnx"))
    for node in reference.graph.node:
        for attr in node.attribute:
            if attr.name == "accuracy_level":
                attr.i = 0
    rewritten = to_dequantize_linear(artifacts / "lm.onnx", tmp_path / "lm.onnx")
    feeds = example_feeds(Manifest.load(artifacts).graph("lm").spec, {NEW: 5, PAST: 7},
                          np.random.default_rng(0))
    want = _session(reference, optimize=False).run(None, feeds)
    got = _session(str(rewritten), optimize=False).run(None, feeds)
    for w, g in zip(want, got):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * np.abs(w).max())
