"""Reading single language-model weights without loading the model."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from vispec.exporter.fixtures.models import FAMILIES
from vispec.exporter.loading import load_target, read_text_weight
from vispec.runtime.errors import ModelDirError


@pytest.mark.parametrize("family", FAMILIES)
def test_weights_read_alone_equal_the_loaded_model(tiny_target, family):
    model_dir, _ = tiny_target(family)
    adapter, _ = load_target(model_dir)
    torch.testing.assert_close(read_text_weight(model_dir, "lm_head.weight"), adapter.lm_head.weight)
    torch.testing.assert_close(read_text_weight(model_dir, "embed_tokens.weight"),
                               adapter.language_model.embed_tokens.weight)


def _rewrite(model_dir, dest, drop_lm_head: bool, tie: bool, fmt: str):
    dest = shutil.copytree(model_dir, dest, ignore=shutil.ignore_patterns("*.safetensors"))
    state = load_file(str(model_dir / "model.safetensors"))
    if drop_lm_head:
        state = {k: v for k, v in state.items() if not k.endswith("lm_head.weight")}
    if fmt == "bin":
        torch.save(state, dest / "pytorch_model.bin")
    else:
        save_file(state, str(dest / "model.safetensors"))
    config = json.loads((dest / "config.json").read_text())
    config["tie_word_embeddings"] = tie
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def test_tied_embeddings_and_bin_checkpoints(tiny_target, tmp_path):
    model_dir, _ = tiny_target("qwen2_5_vl")
    embed = read_text_weight(model_dir, "embed_tokens.weight")
    tied = _rewrite(model_dir, tmp_path / "tied", drop_lm_head=True, tie=True, fmt="bin")
    torch.testing.assert_close(read_text_weight(tied, "lm_head.weight"), embed)
    untied = _rewrite(model_dir, tmp_path / "untied", drop_lm_head=True, tie=False, fmt="safetensors")
    with pytest.raises(ModelDirError, match="lm_head.weight"):
        read_text_weight(untied, "lm_head.weight")
