"""Drafter checkpoints: official layouts round-trip, kinds are detected, bad folders fail early."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from vispec.exporter.drafters.checkpoint import (
    DrafterCheckpointError,
    detect_kind,
    drafter_config,
    load_drafter,
    write_checkpoint,
)
from vispec.exporter.fixtures.drafters import build_tiny_drafter
from vispec.runtime.errors import ModelDirError

KINDS = ("eagle", "vispec", "hivis")


@pytest.fixture(scope="module")
def llava_dir(tiny_target):
    return tiny_target("llava")[0]


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("kind", KINDS)
def test_round_trip(kind, fmt, llava_dir, tmp_path):
    src = build_tiny_drafter(kind, llava_dir, tmp_path / "a", seed=1, fmt=fmt)
    weight = {"safetensors": "model.safetensors", "bin": "pytorch_model.bin"}[fmt]
    assert sorted(p.name for p in src.iterdir()) == ["config.json", weight]
    first = load_drafter(src, llava_dir)
    other = "bin" if fmt == "safetensors" else "safetensors"
    second = load_drafter(write_checkpoint(first, tmp_path / "b", fmt=other), llava_dir)
    assert first.config == second.config and first.kind == second.kind == kind
    for key, value in first.state_dict().items():
        torch.testing.assert_close(second.state_dict()[key], value, rtol=0, atol=0)


def test_official_keys_and_sizes_from_shapes(llava_dir, tmp_path):
    keys = set(load_file(build_tiny_drafter("vispec", llava_dir, tmp_path / "v")
                         / "model.safetensors"))
    assert {"embed_tokens.weight", "fc.weight", "fc.bias", "img_fc.weight", "imadpt.q",
            "imadpt.k_proj.weight", "imadpt.o_proj.weight", "layers.0.self_attn.q_proj.weight",
            "layers.0.mlp.gate_proj.weight", "layers.0.post_attention_layernorm.weight"} <= keys
    assert not any("input_layernorm" in k or "lm_head" in k or k.startswith("norm") for k in keys)
    config = drafter_config(tmp_path / "v")
    assert (config.kind, config.num_q) == ("vispec", 3)
    assert "num_q" not in json.loads((tmp_path / "v" / "config.json").read_text())
    hivis = drafter_config(build_tiny_drafter("hivis", llava_dir, tmp_path / "h"))
    assert (hivis.kind, hivis.residual_rows, hivis.qkv_bias) == ("hivis", 4, True)


def test_embeddings_copied_from_target(llava_dir, tmp_path):
    target = load_file(next(llava_dir.glob("*.safetensors")))
    embed = next(v for k, v in target.items() if k.endswith("embed_tokens.weight"))
    drafter = load_drafter(build_tiny_drafter("eagle", llava_dir, tmp_path / "e"))
    torch.testing.assert_close(drafter.embed_tokens.weight, embed.float(), rtol=0, atol=0)


@pytest.mark.parametrize("keys,kind", [({"fc.weight", "imadpt.q"}, "vispec"),
                                       ({"fc.weight", "residual"}, "hivis"),
                                       ({"fc.weight", "fc.bias"}, "eagle")])
def test_detect_kind(keys, kind):
    assert detect_kind(keys) == kind


def _edit_weights(folder, edit):
    path = folder / "model.safetensors"
    state = load_file(path)
    edit(state)
    save_file(state, path)


@pytest.mark.parametrize("edit,message", [
    (lambda s: s.pop("fc.bias"), "missing keys ['fc.bias']"),
    (lambda s: s.update(extra=torch.zeros(2)), "unexpected keys ['extra']"),
    (lambda s: s.update({"fc.weight": torch.zeros(64, 65)}), "fc.weight (64, 65)"),
])
def test_strict_keys(edit, message, llava_dir, tmp_path):
    folder = build_tiny_drafter("eagle", llava_dir, tmp_path / "d")
    _edit_weights(folder, edit)
    with pytest.raises(DrafterCheckpointError, match="official layout") as err:
        load_drafter(folder, llava_dir)
    assert message in str(err.value)


def test_mismatched_target_fails_before_weights(llava_dir, tmp_path):
    folder = build_tiny_drafter("eagle", llava_dir, tmp_path / "d")
    config = json.loads((folder / "config.json").read_text())
    (folder / "model.safetensors").unlink()  # the check must not need the weights
    for field in ("hidden_size", "vocab_size"):
        (folder / "config.json").write_text(json.dumps({**config, field: config[field] * 2}))
        with pytest.raises(DrafterCheckpointError, match=f"{field} .* target's"):
            load_drafter(folder, llava_dir)


def test_missing_weights_and_config(llava_dir, tmp_path):
    folder = build_tiny_drafter("eagle", llava_dir, tmp_path / "d")
    (folder / "model.safetensors").unlink()
    with pytest.raises(DrafterCheckpointError, match="no drafter weights"):
        load_drafter(folder, llava_dir)
    shutil.rmtree(folder)
    folder.mkdir()
    with pytest.raises(ModelDirError, match="config.json"):
        load_drafter(folder, llava_dir)


def test_old_rotary_buffers_are_ignored_and_missing_embeddings_come_from_the_target(tiny_target, tmp_path):
    import torch
    from safetensors.torch import load_file

    from vispec.exporter.drafters.checkpoint import load_drafter
    from vispec.exporter.fixtures.drafters import build_tiny_drafter
    from vispec.exporter.loading import read_text_weight

    model_dir, _ = tiny_target("llava")
    drafter_dir = build_tiny_drafter("eagle", model_dir, tmp_path / "d")
    state = load_file(str(drafter_dir / "model.safetensors"))
    reference = load_drafter(drafter_dir, model_dir).state_dict()
    state.pop("embed_tokens.weight")
    state["layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    (drafter_dir / "model.safetensors").unlink()
    torch.save(state, drafter_dir / "pytorch_model.bin")
    loaded = load_drafter(drafter_dir, model_dir)
    torch.testing.assert_close(loaded.embed_tokens.weight, read_text_weight(model_dir, "embed_tokens.weight"))
    torch.testing.assert_close(loaded.state_dict()["fc.weight"], reference["fc.weight"])
