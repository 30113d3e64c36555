"""INT8 Q/DQ: weight matmuls only, symmetric, per channel; close to fp32 in ONNX Runtime."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from tiny_block import SPEC, export_block, feeds

from vispec.engines.quantize import (
    lm_calibration_feeds,
    prefill_feeds,
    qdq_session,
    quantize_qdq,
    weight_nodes,
)
from vispec.runtime.errors import ShapeError, VispecError
from vispec.runtime.manifest import Manifest
from vispec.runtime.specs import lm_step_spec


@pytest.fixture(scope="module")
def block(tmp_path_factory):
    folder = tmp_path_factory.mktemp("block")
    fp32 = export_block(folder / "block.onnx")
    return fp32, quantize_block(fp32, folder / "block.int8.onnx")


def run(path, feed):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]


def run_qdq(path, feed):
    return qdq_session(path).run(None, feed)[0]


def quantize_block(fp32, out):
    calibration = (feeds(new, seed) for seed, new in enumerate((4, 8, 16, 32, 8, 64)))
    return quantize_qdq(fp32, out, calibration, SPEC)


def test_only_linear_layer_inputs_get_qdq(block):
    fp32, int8 = block
    model = onnx.load(str(int8))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") == 4    # activations into qkv, out, up, down
    assert ops.count("DequantizeLinear") == 8  # ... and their int8 weights
    consumers = {i: n for n in model.graph.node for i in n.input}
    dq_outputs = [n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"]
    quantized = set(weight_nodes(onnx.load(str(fp32))))
    assert len(quantized) == 4
    assert {consumers[o].name for o in dq_outputs} == quantized  # not softmax, norm, Q @ K^T


def test_symmetric_per_channel_int8_weights(block):
    model = onnx.load(str(block[1]))
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        assert init[node.input[2]].dtype == np.int8 and not init[node.input[2]].any()
        if node.input[0] in init:  # a weight: one scale per output channel
            axis = {a.name: a.i for a in node.attribute}["axis"]
            assert axis == 1 and init[node.input[1]].shape == (init[node.input[0]].shape[1],)


@pytest.mark.parametrize("new", [1, 12, 100])
def test_int8_close_to_fp32_at_unseen_lengths(block, new):
    fp32, int8 = block
    feed = feeds(new, seed=99)
    want, got = run(fp32, feed), run_qdq(int8, feed)
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()
    assert not np.array_equal(got, want)


def test_int8_graph_is_deterministic(block, tmp_path):
    fp32, int8 = block
    again = quantize_block(fp32, tmp_path / "again.onnx")
    assert onnx.load(str(again)).graph == onnx.load(str(int8)).graph


def test_qdq_session_follows_the_onnx_qdq_semantics(block):
    """The fused int8 kernels of ONNX Runtime's CPU provider saturate on x86 CPUs without
    VNNI; qdq_session must match the op-by-op Q/DQ evaluation (no fusion) on any CPU."""
    _, int8 = block
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    op_by_op = ort.InferenceSession(str(int8), options, providers=["CPUExecutionProvider"])
    for new in (1, 12, 100):
        feed = feeds(new, seed=7)
        np.testing.assert_allclose(run_qdq(int8, feed), op_by_op.run(None, feed)[0],
                                   rtol=1e-5, atol=1e-5)


def test_empty_or_wrong_calibration_is_refused(block, tmp_path):
    fp32, _ = block
    with pytest.raises(VispecError, match="calibration data was empty"):
        quantize_qdq(fp32, tmp_path / "empty.onnx", [], SPEC)
    assert not (tmp_path / "empty.onnx").exists()
    with pytest.raises(ShapeError, match="input 'x' | dtype float64"):
        quantize_qdq(fp32, tmp_path / "bad.onnx", [{"x": np.zeros((1, 4, 32))}], SPEC)


def test_lm_quantized_on_real_prefill_feeds(tiny_target, noise_image, tmp_path):
    _, artifacts = tiny_target("llava")
    entry = Manifest.load(artifacts).graph("lm")
    prompts = ["Describe the red boat.", ("What is this?", [noise_image(seed=1)]),
               "Count from one to ten."]
    calibration = list(lm_calibration_feeds(artifacts, prompts))
    for feed in calibration:
        sizes = entry.spec.check_inputs(feed)
        assert sizes["past"] == 0 and feed["attention_mask"][0, 0, 0, 1:].sum() == 0
    assert max(f["inputs_embeds"].shape[1] for f in calibration) > 16  # image tokens placed
    int8 = quantize_qdq(artifacts / entry.file, tmp_path / "lm.int8.onnx", calibration, entry.spec)
    feed = calibration[1]
    want, got = run(artifacts / entry.file, feed), run_qdq(int8, feed)  # logits [1, S, V]
    assert np.abs(got - want).max() < 0.1 * np.abs(want).max()


def test_prefill_feeds_follow_the_spec():
    spec = lm_step_spec(num_layers=1, hidden_size=8, vocab_size=16, kv_heads=1, head_dim=8,
                        max_len=32, mrope=True)
    embeds = np.ones((5, 8), np.float32)
    positions = np.broadcast_to(np.arange(5), (3, 1, 5))
    feed = prefill_feeds(spec, embeds, positions)
    assert spec.check_inputs(feed) == {"new": 5, "past": 0}
    assert np.array_equal(feed["attention_mask"][0, 0], np.tri(5, dtype=bool))
