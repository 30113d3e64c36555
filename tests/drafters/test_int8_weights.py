"""int8 (and int4) drafter weights: the quantized graph against PyTorch, exact speculative
output, and where it may not go (TensorRT)."""
import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from engines.build import BuildConfig, plan_build
from vispec.exporter.cli import cli
from vispec.exporter.drafters.export import _compare_all, export_drafter, validate_drafter
from vispec.exporter.onnx_io import example_feeds
from vispec.exporter.weight_quant import quantize_matmuls
from vispec.runtime.backends import make_runner
from vispec.runtime.drafter_specs import DRAFT
from vispec.runtime.drafters import open_drafter
from vispec.runtime.errors import VispecError
from vispec.runtime.manifest import Manifest
from vispec.runtime.specs import INPUT_IDS, LOGIT_ROWS, NEW, PAST, TOPK_IDS, TOPK_LOGPROBS
from vispec.runtime.target import TargetModel
from vispec.runtime.weights import require_weights_runtime


@pytest.fixture(scope="module")
def int8_drafter(tiny_target, tiny_drafter, tmp_path_factory):
    """``int8_drafter(kind, family, weights="int8") -> (drafter_dir, float32 artifacts,
    quantized artifacts)``."""
    made = {}

    def get(kind, family, weights="int8"):
        if (kind, family, weights) not in made:
            model_dir, _ = tiny_target(family)
            drafter_dir, fp32 = tiny_drafter(kind, family)
            out = tmp_path_factory.mktemp(f"{weights}-{kind}-{family}") / "artifacts"
            export_drafter(drafter_dir, model_dir, out, top_k=4, max_len=256, weights=weights)
            made[kind, family, weights] = drafter_dir, fp32, out
        return made[kind, family, weights]

    return get


@pytest.mark.parametrize("kind,family", [("vispec", "llava"), ("hivis", "qwen2_5_vl"),
                                         ("eagle", "llava_next")])
def test_int8_draft_graph_is_quantized_and_within_int8_tolerance(int8_drafter, tiny_target,
                                                                  kind, family):
    drafter_dir, fp32, int8 = int8_drafter(kind, family)
    manifest = Manifest.load(int8)
    assert manifest.model["weights"] == "int8"
    assert Manifest.load(fp32).model["weights"] == "float32"
    ops = {n.op_type for n in onnx.load(str(int8 / manifest.graph(DRAFT).file)).graph.node}
    assert "MatMulNBits" in ops
    rows = validate_drafter(drafter_dir, tiny_target(family)[0], int8)
    assert all(r.passed for r in rows), [r for r in rows if not r.passed]
    draft = [r for r in rows if r.graph == DRAFT]
    assert {r.precision for r in draft} == {"int8"}
    assert max(r.rel for r in draft) > 1e-4  # really quantized: beyond float32 rounding
    assert any("top-1 kept" in r.output for r in draft)


@pytest.mark.parametrize("kind,family", [("vispec", "llava"), ("hivis", "qwen2_5_vl"),
                                         ("eagle", "llava_next")])
def test_greedy_with_int8_weights_equals_plain(int8_drafter, tiny_target, assert_greedy_exact,
                                               kind, family):
    _, _, int8 = int8_drafter(kind, family)
    target = TargetModel(tiny_target(family)[1])
    assert_greedy_exact(target, open_drafter(int8, target))


def test_int4_draft_graph_within_int4_tolerance_and_exact(int8_drafter, tiny_target,
                                                          assert_greedy_exact):
    drafter_dir, _, int4 = int8_drafter("vispec", "llava", "int4")
    manifest = Manifest.load(int4)
    assert manifest.model["weights"] == "int4"
    bits = {a.i for n in onnx.load(str(int4 / manifest.graph(DRAFT).file)).graph.node
            if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"}
    assert bits == {4}
    rows = validate_drafter(drafter_dir, tiny_target("llava")[0], int4)
    assert all(r.passed for r in rows), [r for r in rows if not r.passed]
    assert {r.precision for r in rows if r.graph == DRAFT} == {"int4"}
    target = TargetModel(tiny_target("llava")[1])
    assert_greedy_exact(target, open_drafter(int4, target))


def test_tensorrt_build_refuses_int8_weights(int8_drafter):
    _, _, int8 = int8_drafter("eagle", "llava_next")
    with pytest.raises(VispecError, match="without --weights.*Hint|Hint.*without --weights"):
        plan_build(Manifest.load(int8), int8, BuildConfig(precision="fp16"), "10.3.0")


def test_cli_weights_option(tiny_target, tiny_drafter, tmp_path):
    model_dir, _ = tiny_target("llava")
    drafter_dir, _ = tiny_drafter("eagle", "llava")
    args = ["export-drafter", str(drafter_dir), str(tmp_path / "out"), "--target", str(model_dir),
            "--top-k", "4", "--max-len", "256"]
    bad = CliRunner().invoke(cli, args + ["--weights", "int2"])
    assert bad.exit_code == 2 and "int4" in bad.output and not (tmp_path / "out").exists()
    good = CliRunner().invoke(cli, args + ["--weights", "int8"])
    assert good.exit_code == 0, good.output
    assert "int8" in good.output and Manifest.load(tmp_path / "out").model["weights"] == "int8"


def test_int8_weights_need_ort_cpu_1_22(int8_drafter, tiny_target, monkeypatch):
    import onnxruntime

    _, _, int8 = int8_drafter("eagle", "llava_next")
    target = TargetModel(tiny_target("llava_next")[1])
    with pytest.raises(VispecError, match="CPU provider only.*Hint: export the drafter again"):
        require_weights_runtime("int8", "ort-cuda", f"the drafter in {int8}",
                                hint="export the drafter again without --weights")
    monkeypatch.setattr(onnxruntime, "__version__", "1.21.1")
    with pytest.raises(VispecError, match=r"onnxruntime >= 1\.22 \(installed: 1\.21\.1\)"):
        open_drafter(int8, target)


def test_int8_parity_catches_wrong_ids():
    """The top-k ids row fails when the graph's ids are not the reference's beyond near-ties
    (shifted ids, same log-probs), not when only their order moved."""
    want = {TOPK_LOGPROBS: np.log(np.array([[[0.6, 0.2, 0.1, 0.1]] * 3], np.float32)),
            TOPK_IDS: np.array([[[5, 6, 7, 8]] * 3])}
    shifted = {**want, TOPK_IDS: want[TOPK_IDS] + 10}
    swapped = {**want, TOPK_IDS: want[TOPK_IDS][..., ::-1].copy()}
    [bad] = [r for r in _compare_all(DRAFT, "t", shifted, want, "int8") if "ids" in r.output]
    [ok] = [r for r in _compare_all(DRAFT, "t", swapped, want, "int8") if "ids" in r.output]
    assert not bad.passed and bad.max_abs == 3 and ok.passed


def test_int8_keeps_external_data_of_a_large_graph(tiny_drafter, tmp_path):
    """A graph exported with external data (what a >2 GB float32 drafter gets) is quantized
    into one ``.data`` file, the float32 tensor files removed, with the same int8 graph as
    the inline one."""
    _, fp32 = tiny_drafter("eagle", "llava_next")
    entry = Manifest.load(fp32).graph(DRAFT)
    inline, external = tmp_path / "inline" / "draft.onnx", tmp_path / "external" / "draft.onnx"
    for path in (inline, external):
        path.parent.mkdir()
        onnx.save_model(onnx.load(str(fp32 / entry.file)), str(path),
                        save_as_external_data=path is external, all_tensors_to_one_file=False,
                        size_threshold=0)
    assert len(list(external.parent.iterdir())) > 5
    for path in (inline, external):
        quantize_matmuls(path, 8)
    assert sorted(p.name for p in external.parent.iterdir()) == ["draft.onnx", "draft.onnx.data"]
    feeds = example_feeds(entry.spec, {NEW: 3, PAST: 5}, np.random.default_rng(0),
                          **{INPUT_IDS: np.array([[1, 2, 3]]), LOGIT_ROWS: np.array([2, 0])})
    outputs = [make_runner("ort", p, entry.spec).infer(feeds) for p in (inline, external)]
    for name in entry.spec.output_names:
        np.testing.assert_array_equal(outputs[0][name], outputs[1][name])
