"""float16 export: embed/LM graphs and KV cache in fp16, validated at the fp16 tolerance."""
import numpy as np
import pytest
import torch

from vispec.exporter.export import export_target
from vispec.exporter.loading import load_target
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
    assert all(r.tol == 2e-2 for r in rows)
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
