"""float16 export: embed/LM graphs and KV cache in fp16, validated against PyTorch's fp16."""
import numpy as np
import pytest
import torch

from vispec.exporter.export import export_target
from vispec.exporter.loading import load_target
from vispec.exporter.parity import BASELINE_RATIO, compare, tolerance
from vispec.exporter.report import greedy_check
from vispec.exporter.validate import validate_target
from vispec.runtime import TargetModel, TreeConfig, generate_plain, generate_speculative, open_drafter


@pytest.fixture(scope="module")
def fp16_target(tiny_target, tmp_path_factory):
    exported = {}

    def get(family):
        if family not in exported:
            model_dir, _ = tiny_target(family)
            out = tmp_path_factory.mktemp(f"{family}-fp16") / "artifacts"
            export_target(model_dir, out, max_len=256, dtype="float16")
            exported[family] = (model_dir, out)
        return exported[family]

    return get


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_fp16_graphs_within_the_fp16_tolerance(fp16_target, family):
    model_dir, artifacts = fp16_target(family)
    rows = validate_target(model_dir, artifacts, seed=2)
    assert all(r.baseline is not None and r.weights_floor is not None for r in rows)
    assert all(r.tol == tolerance("float16", r.reference_error) for r in rows)
    assert [r for r in rows if not r.passed] == []
    assert max(r.rel for r in rows if r.graph == "lm") > 1e-5  # really fp16, not fp32
    check = greedy_check(model_dir, artifacts, max_new_tokens=12)
    assert check.precision == "float16" and check.passed, check.summary()


def test_fp16_runtime_buffers_and_speculative_identity(fp16_target, tiny_drafter, noise_image):
    _, artifacts = fp16_target("llava")
    target = TargetModel(artifacts)
    assert target.new_cache().buffer.dtype == np.float16
    drafter = open_drafter(tiny_drafter("eagle", "llava")[1], target)  # fp32 drafter
    prompt = target.prepare("Describe the red boat.", [noise_image()])
    plain = generate_plain(target, prompt, 24)
    assert generate_speculative(target, drafter, prompt, 24, tree=TreeConfig(10, 3, 3)).tokens == \
        plain.tokens


@pytest.mark.parametrize("family", ["llava_next", "qwen2_5_vl"])
def test_fp16_load_keeps_vision_and_rotary_tables_float32(tiny_target, family):
    adapter, _ = load_target(tiny_target(family)[0], "float16")
    assert adapter.lm_head.weight.dtype == torch.float16
    assert adapter.language_model.layers[0].mlp.up_proj.weight.dtype == torch.float16
    assert adapter.language_model.rotary_emb.inv_freq.dtype == torch.float32
    vision = [p.dtype for n, p in adapter.model.model.named_parameters() if "language_model" not in n]
    assert vision and set(vision) == {torch.float32}


def test_fp16_bound_is_relative_to_pytorch_fp16_plus_rounding_slack():
    want = np.linspace(-4, 4, 200)
    near = compare("lm", "c", "o", want + 0.03, want, "float16", baseline=0.01, weights_floor=0.005)
    assert near.reference_error == 0.01 and near.ratio == pytest.approx(0.75)
    assert near.passed and near.tol == pytest.approx(BASELINE_RATIO * 0.01 + 2.0 ** -10)
    assert not compare("lm", "c", "o", want + 0.06, want, "float16", baseline=0.01).passed
    tiny = compare("lm", "c", "o", want + 0.004, want, "float16", baseline=1e-4, weights_floor=1e-4)
    assert tiny.passed and tiny.tol == pytest.approx(1.25e-4 + 2.0 ** -10)  # 2 fp16 roundings
    assert compare("lm", "c", "o", want + 0.04, want, "float16").tol == 2e-2  # no baseline


def test_float32_math_restores_the_fp16_weights(tiny_target):
    from vispec.exporter.reference import float32_math

    adapter, _ = load_target(tiny_target("llava")[0], "float16")
    before = {n: t.clone() for n, t in adapter.model.state_dict().items()}
    with float32_math(adapter) as exact:
        assert exact.lm_head.weight.dtype == torch.float32
    after = adapter.model.state_dict()
    assert all(after[n].dtype == t.dtype and torch.equal(after[n], t) for n, t in before.items())
    assert adapter.language_model.rotary_emb.inv_freq.dtype == torch.float32
