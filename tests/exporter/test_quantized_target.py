"""Quantized target weights (``export --weights int4|int8``): the rewritten graphs, validation
against PyTorch float32, speculative exactness on the quantized target, where they may run."""
import numpy as np
import onnx
import onnxruntime
import pytest
from click.testing import CliRunner

from vispec.exporter.cli import cli
from vispec.exporter.export import example_images, export_target
from vispec.exporter.parity import TOLERANCES
from vispec.exporter.report import greedy_check, validate_all
from vispec.exporter.validate import PROMPT
from vispec.runtime.drafters import open_drafter
from vispec.runtime.errors import VispecError
from vispec.runtime.manifest import Manifest
from vispec.runtime.specs import LOGITS
from vispec.runtime.target import TargetModel
from vispec.runtime.ties import teacher_forced_logits

MAX_LEN = 256


@pytest.fixture(scope="module")
def int4_target(tiny_target, tmp_path_factory):
    """(model_dir, float32 artifacts, int4 artifacts with the head and embedding quantized)."""
    model_dir, fp32 = tiny_target("llava")
    out = tmp_path_factory.mktemp("int4") / "artifacts"
    export_target(model_dir, out, max_len=MAX_LEN, weights="int4", weights_exclude=())
    return model_dir, fp32, out


def _nodes(path):
    model = onnx.load(str(path))
    return model.graph.node, {t.name for t in model.graph.initializer}


def test_int4_graphs_hold_4_bit_weights(int4_target):
    _, fp32, int4 = int4_target
    facts = Manifest.load(int4).model
    assert (facts["weights"], facts["weights_block"], facts["weights_exclude"]) == ("int4", 32, [])
    assert Manifest.load(fp32).model["weights"] == "float32"
    nodes, weights = _nodes(int4 / "lm.onnx")
    nbits = [n for n in nodes if n.op_type == "MatMulNBits"]
    attrs = [{a.name: a.i for a in n.attribute} for n in nbits]
    assert all(a["bits"] == 4 and a["block_size"] == 32 and a["accuracy_level"] == 4 for a in attrs)
    assert any(LOGITS in n.output for n in nbits)  # the head too
    assert not [n for n in nodes if n.op_type == "MatMul" and set(n.input) & weights]
    fp32_model = onnx.load(str(fp32 / "lm.onnx"))
    fp32_weights = {t.name: t.dims for t in fp32_model.graph.initializer}
    fp32_products = [fp32_weights[n.input[1]] for n in fp32_model.graph.node
                     if n.op_type == "MatMul" and n.input[1] in fp32_weights]
    assert sum(a["N"] for a in attrs) == sum(dims[1] for dims in fp32_products)
    assert len(nbits) < len(fp32_products)  # q/k/v and gate/up share one call each
    assert [n.op_type for n in _nodes(int4 / "embed.onnx")[0]] == ["GatherBlockQuantized"]
    assert "embed" in TargetModel(int4).runners  # a quantized table stays in its graph
    assert (int4 / "lm.onnx").stat().st_size < 0.3 * (fp32 / "lm.onnx").stat().st_size


def test_quantized_embedding_is_the_table_within_half_a_step(int4_target):
    """GatherBlockQuantized reads back each row to within half a quantization step of the
    float table (step = the 32-wide block's max |value| / 7); the packing order, zero point
    and scales line up, or the error would be of the values' own size."""
    _, fp32, int4 = int4_target
    ids = np.arange(0, 400, 7)
    want = TargetModel(fp32).embed(ids)          # [n, H] float32 rows
    got = TargetModel(int4).embed(ids)
    step = np.abs(want.reshape(len(ids), -1, 32)).max(-1, keepdims=True) / 7
    err = np.abs(got - want).reshape(len(ids), -1, 32)
    assert (err <= step / 2 * (1 + 1e-5)).all() and err.max() > 0


def test_validate_reports_int4_error_and_agreement(int4_target):
    model_dir, _, int4 = int4_target
    rows, checks = validate_all(model_dir, int4, max_new_tokens=12)
    assert all(r.passed for r in rows), [r for r in rows if not r.passed]
    by_graph = {r.graph: r.precision for r in rows}
    assert by_graph == {"embed": "int4", "vision": "float32", "lm": "int4"}
    lm = [r for r in rows if r.graph == "lm"]
    assert all(r.tol == TOLERANCES["int4"] for r in lm)
    assert max(r.rel for r in lm) > 10 * TOLERANCES["float32"]  # really quantized
    assert [c.label for c in checks] == ["image prompt", "text prompt 1", "text prompt 2"]
    for check in checks:
        assert check.precision == "int4" and 0.0 <= check.agreement <= 1.0
        assert "teacher-forced top-1 agreement" in check.summary()
        assert check.agreement == 1 - check.flips / len(check.reference)
        if check.first_difference is not None:  # greedy output departs where a flip is
            assert check.flips > 0


def test_greedy_speculative_equals_plain_on_the_int4_target(int4_target, tiny_drafter,
                                                            assert_greedy_exact):
    """Drafters exported for the model run on its int4 target (their features come from
    it): output stays the quantized target's own greedy output."""
    *_, int4 = int4_target
    target = TargetModel(int4)
    for kind in ("vispec", "eagle"):
        assert_greedy_exact(target, open_drafter(tiny_drafter(kind, "llava")[1], target))


def test_quantized_target_runs_on_ort_cpu_only(int4_target, monkeypatch):
    *_, int4 = int4_target
    with pytest.raises(VispecError, match="CPU provider only.*Hint: export again without "
                                          "--weights, or build TensorRT engines"):
        TargetModel(int4, backend="ort-cuda")
    monkeypatch.setattr(onnxruntime, "__version__", "1.21.0")
    with pytest.raises(VispecError, match=r"onnxruntime >= 1\.22 \(installed: 1\.21\.0\)"):
        TargetModel(int4)


def test_cli_int8_weights_with_the_head_kept_float_and_the_embedding_not(tiny_target, tmp_path):
    model_dir, _ = tiny_target("llava")
    args = ["export", str(model_dir), str(tmp_path / "out"), "--max-len", str(MAX_LEN)]
    bad = CliRunner().invoke(cli, args + ["--weights", "int8", "--weights-exclude", "tail"])
    assert bad.exit_code == 2 and "head" in bad.output and not (tmp_path / "out").exists()
    good = CliRunner().invoke(cli, args + ["--weights", "int8", "--weights-block", "64",
                                           "--weights-exclude", "head"])
    assert good.exit_code == 0, good.output
    facts = Manifest.load(tmp_path / "out").model
    assert (facts["weights"], facts["weights_block"], facts["weights_exclude"]) == ("int8", 64, ["head"])
    nodes, _ = _nodes(tmp_path / "out" / "lm.onnx")
    [head] = [n for n in nodes if LOGITS in n.output]
    assert head.op_type == "MatMul"
    assert {a.i for n in nodes if n.op_type == "MatMulNBits" for a in n.attribute
            if a.name == "bits"} == {8}
    assert [n.op_type for n in _nodes(tmp_path / "out" / "embed.onnx")[0]] == ["GatherBlockQuantized"]


def test_gptq_export_agrees_with_pytorch_more_than_round_to_nearest(int4_target, tmp_path):
    """GPTQ calibrated on the validation prompt (with and without its image) keeps more of
    the float32 model's greedy tokens there than round to nearest (tiny LLaVA, int4: 0.75 vs
    0.38 of 16 with the built-in set). At int4 its weights are 4-bit min/max blocks with zero
    points, one ``MatMulNBits`` a product (no float part), the head int8."""
    model_dir, _, rtn = int4_target
    example_images()[0].save(tmp_path / "image.png")
    (tmp_path / "prompts.txt").write_text(f"{PROMPT}\nimage.png\t{PROMPT}\n")
    gptq = tmp_path / "gptq"
    export_target(model_dir, gptq, max_len=MAX_LEN, weights="int4", weights_exclude=(),
                  weights_method="gptq", calibration=tmp_path / "prompts.txt")
    assert Manifest.load(gptq).model["weights_method"] == "gptq"
    assert greedy_check(model_dir, gptq).agreement > greedy_check(model_dir, rtn).agreement
    nodes, weights = _nodes(gptq / "lm.onnx")
    assert not [w for w in weights if "block_sums" in w]  # no float part
    assert not [n for n in nodes if n.op_type == "MatMul" and set(n.input) & weights]
    nbits = {n.output[0]: (len(n.input), {a.name: a.i for a in n.attribute}) for n in nodes
             if n.op_type == "MatMulNBits"}
    assert nbits.pop(LOGITS)[1]["bits"] == 8
    assert all(inputs == 4 and a["bits"] == 4 for inputs, a in nbits.values())  # zero points


def test_gptq_catches_each_familys_layer_inputs(tiny_target, tmp_path):
    """GPTQ runs each decoder layer alone on inputs caught at the first one (Qwen2.5-VL's
    multimodal rotary positions included): it keeps more of the float32 model's greedy
    tokens than round to nearest (tiny Qwen2.5-VL, int4: 10 vs 5 of 16)."""
    model_dir, _ = tiny_target("qwen2_5_vl")
    agreement = {}
    for method in ("rtn", "gptq"):
        export_target(model_dir, tmp_path / method, max_len=MAX_LEN, weights="int4",
                      weights_method=method)
        agreement[method] = greedy_check(model_dir, tmp_path / method).agreement
    assert agreement["gptq"] > agreement["rtn"], agreement


def _head(path):
    """(inputs, bits) of the LM head's ``MatMulNBits``; asserts every other product is 4-bit."""
    nodes, _ = _nodes(path / "lm.onnx")
    nbits = {n.output[0]: (len(n.input), {a.name: a.i for a in n.attribute}["bits"])
             for n in nodes if n.op_type == "MatMulNBits"}
    head = nbits.pop(LOGITS)
    assert {bits for _, bits in nbits.values()} == {4}
    return head


def test_the_heads_precision_apart_from_the_layers(int4_target, tmp_path):
    """``weights_head``: an int8 head beside round-to-nearest int4 layers, an int4 head on
    min/max's zero-point grid; the manifest records it; beside the same int4 layers with a
    float head, the int8 head's logits lie closer than the int4 head's."""
    model_dir, *_ = int4_target
    exports = {"head8": {"weights_head": "int8"}, "head4": {},
               "float": {"weights_exclude": ("head", "embed")},
               "minmax4": {"weights_method": "minmax", "weights_head": "int4"}}
    for name, options in exports.items():
        export_target(model_dir, tmp_path / name, max_len=MAX_LEN, weights="int4", **options)
    heads = {name: (*_head(tmp_path / name), Manifest.load(tmp_path / name).model["weights_head"])
             for name in ("head8", "head4", "minmax4")}
    assert heads == {"head8": (3, 8, "int8"), "head4": (3, 4, "int4"),
                     "minmax4": (4, 4, "int4")}  # zero points
    assert "weights_head" not in Manifest.load(tmp_path / "float").model
    reference = TargetModel(tmp_path / "float")
    prompt = reference.prepare(PROMPT)
    tokens = [5, 17, 3, 29, 11]
    want = teacher_forced_logits(reference, prompt, tokens)
    error = {name: np.abs(teacher_forced_logits(TargetModel(tmp_path / name), prompt, tokens)
                          - want).max() for name in ("head8", "head4")}
    assert error["head8"] * 4 < error["head4"], error


def test_cli_refuses_a_head_precision_nothing_quantizes(tiny_target, tmp_path):
    model_dir, _ = tiny_target("llava")
    out = tmp_path / "out"
    args = ["export", str(model_dir), str(out), "--max-len", str(MAX_LEN), "--weights-head", "int4"]
    for extra, said in (([], "float weights"),
                        (["--weights", "int8", "--weights-exclude", "head"], "the head excluded")):
        result = CliRunner().invoke(cli, args + extra)
        assert result.exit_code == 2, result.output
        assert said in result.output and "Hint: drop --weights-head" in result.output
        assert not out.exists()
