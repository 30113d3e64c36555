"""Self-distillation makes drafters predict the tiny target; the result is an official
checkpoint that exports and speeds up the runtime without changing its output."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from vispec.exporter.drafters.checkpoint import load_drafter, new_drafter
from vispec.exporter.drafters.export import export_drafter, target_lm_head
from vispec.exporter.drafters.train import TrainConfig, evaluate, fit, make_training_data, train_drafter
from vispec.exporter.loading import load_target
from vispec.runtime.drafters import open_drafter
from vispec.runtime.errors import VispecError
from vispec.runtime.generate import generate_plain
from vispec.runtime.speculative import generate_speculative
from vispec.runtime.target import TargetModel
from vispec.runtime.tree import TreeConfig

SMALL = TrainConfig(steps=80, sequences=24, new_tokens=32, batch=4)
TOP_K = 4  # as the untrained tiny_drafter fixture is exported
TREE = TreeConfig(16, 3, TOP_K)


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def trained(tiny_target, tmp_path_factory):
    """``trained(kind) -> (drafter_dir, artifact_dir)``: SMALL-trained on tiny LLaVA, once."""
    done = {}

    def get(kind):
        if kind not in done:
            model_dir, _ = tiny_target("llava")
            root = tmp_path_factory.mktemp(f"trained-{kind}")
            drafter_dir = train_drafter(model_dir, root / "drafter", kind=kind, config=SMALL)
            export_drafter(drafter_dir, model_dir, root / "artifacts", top_k=TOP_K,
                           max_len=256)
            done[kind] = drafter_dir, root / "artifacts"
        return done[kind]

    return get


@pytest.mark.parametrize("field, value", [("steps", 0), ("lr", 0.0), ("sequences", 0),
                                          ("new_tokens", 0), ("temperature", -1.0),
                                          ("feature_weight", -0.1), ("batch", 0), ("vocab", -1)])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=f"TrainConfig \\| {field}="):
        TrainConfig(**{field: value})


def test_training_lowers_held_out_loss_and_raises_agreement(tiny_target):
    model_dir, _ = tiny_target("llava")
    train = make_training_data(model_dir, SMALL)
    held_out = make_training_data(model_dir, TrainConfig(sequences=6, new_tokens=32, seed=1))
    assert any(s.ids.tolist() != t.ids.tolist() for s, t in zip(train, held_out))
    assert [len(s.ids) for s in train] == [len(s.embeds) for s in train]
    _, glue = load_target(model_dir)
    lm_head = target_lm_head(model_dir)
    drafter = new_drafter("vispec", model_dir)
    before = evaluate(drafter, lm_head, glue, held_out)
    fit(drafter, lm_head, glue, train, SMALL)
    after = evaluate(drafter, lm_head, glue, held_out)
    assert after.loss < before.loss
    assert after.top1 > before.top1 + 0.05


def test_a_loss_over_the_frequent_tokens_trains_the_full_head_too(tiny_target):
    model_dir, _ = tiny_target("llava")
    train = make_training_data(model_dir, SMALL)
    held_out = make_training_data(model_dir, TrainConfig(sequences=6, new_tokens=32, seed=1))
    _, glue = load_target(model_dir)
    lm_head = target_lm_head(model_dir)
    drafter = new_drafter("eagle", model_dir)
    before = evaluate(drafter, lm_head, glue, held_out)
    fit(drafter, lm_head, glue, train, replace(SMALL, vocab=len(lm_head) // 4))
    after = evaluate(drafter, lm_head, glue, held_out)  # scored on the whole vocabulary
    assert after.top1 > before.top1 + 0.05 and after.loss < before.loss


def test_sampled_data_differs_from_greedy(tiny_target):
    model_dir, _ = tiny_target("llava")
    config = TrainConfig(sequences=2, new_tokens=8, with_images=False)
    greedy = make_training_data(model_dir, config)
    sampled = make_training_data(model_dir, TrainConfig(sequences=2, new_tokens=8,
                                                        with_images=False, temperature=1.0))
    assert [s.ids[:-8].tolist() for s in greedy] == [s.ids[:-8].tolist() for s in sampled]
    assert [s.ids.tolist() for s in greedy] != [s.ids.tolist() for s in sampled]
    for s in greedy:  # greedy continuations are the target's argmax chain
        np.testing.assert_array_equal(s.ids[-7:], s.logits[-8:-1].argmax(-1).numpy())


@pytest.mark.parametrize("kind", ["eagle", "vispec", "hivis"])
def test_trained_drafter_accepts_more_with_identical_output(kind, trained, tiny_drafter,
                                                            tiny_target, noise_image):
    target = TargetModel(tiny_target("llava")[1])
    untrained = open_drafter(tiny_drafter(kind, "llava")[1], target)
    drafter = open_drafter(trained(kind)[1], target)
    accepted = {"untrained": [], "trained": []}
    for text, images in [("What is near the old house?", []),
                         ("Describe the picture.", [noise_image(seed=7)])]:
        prompt = target.prepare(text, images)
        plain = generate_plain(target, prompt, 32)
        for name, session in (("untrained", untrained), ("trained", drafter)):
            result = generate_speculative(target, session, prompt, 32, tree=TREE)
            assert result.tokens == plain.tokens
            accepted[name].append(result.stats.mean_accepted)
    assert np.mean(accepted["trained"]) > np.mean(accepted["untrained"]) + 0.05


def test_checkpoint_is_official_layout_and_written_atomically(trained, tiny_target, tmp_path):
    model_dir, _ = tiny_target("llava")
    drafter_dir, _ = trained("hivis")
    drafter = load_drafter(drafter_dir, model_dir)  # strict
    fresh = new_drafter("hivis", model_dir)
    assert drafter.kind == "hivis"
    assert drafter.state_dict().keys() == fresh.state_dict().keys()
    torch.testing.assert_close(drafter.embed_tokens.weight, fresh.embed_tokens.weight)  # frozen
    assert not torch.equal(drafter.fc.weight, fresh.fc.weight)
    assert sorted(p.name for p in drafter_dir.parent.iterdir()) == ["artifacts", "drafter"]
    with pytest.raises(VispecError, match="already exists"):
        train_drafter(model_dir, drafter_dir, kind="hivis", config=TrainConfig(steps=1,
                                                                               sequences=1))


def test_init_dir_continues_a_checkpoint(trained, tiny_target, tmp_path):
    model_dir, _ = tiny_target("llava")
    drafter_dir, _ = trained("eagle")
    config = TrainConfig(steps=2, sequences=2, new_tokens=4)
    out = train_drafter(model_dir, tmp_path / "more", init_dir=drafter_dir, config=config)
    assert load_drafter(out, model_dir).kind == "eagle"
    with pytest.raises(ValueError, match="holds a 'eagle' drafter, not 'vispec'"):
        train_drafter(model_dir, tmp_path / "x", kind="vispec", init_dir=drafter_dir,
                      config=config)
    with pytest.raises(ValueError, match="needs a `kind` or an `init_dir`"):
        train_drafter(model_dir, tmp_path / "y", config=config)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_data_from_several_distill_folders(tiny_target, tmp_path):
    """``data`` may list folders (the recipe keeps text and image answers apart): the
    sequences of all of them, in order."""
    import json

    from vispec.exporter.drafters.distill import DistillDataConfig, distill_data
    from vispec.exporter.drafters.train import LOG_FILE, load_samples

    model_dir, _ = tiny_target("llava")
    text = distill_data(model_dir, tmp_path / "text", DistillDataConfig(
        text_prompts=3, max_new_tokens=4, batch=3), prompts=["a", "b", "c"])
    images = distill_data(model_dir, tmp_path / "images", DistillDataConfig(
        text_prompts=0, synthetic_images=1, image_tokens=4, batch=2), prompts=[])
    out = train_drafter(model_dir, tmp_path / "eagle", kind="eagle", data=[text, images],
                        config=TrainConfig(steps=1, batch=2))
    log = json.loads((out / LOG_FILE).read_text())
    assert log["sequences"] == len(load_samples(text)) + len(load_samples(images)) == 5
    assert log["data"] == f"{text}, {images}"
    from click.testing import CliRunner

    from vispec.exporter.cli import cli
    result = CliRunner().invoke(cli, ["train-drafter", str(model_dir), str(tmp_path / "cli"),
                                      "--kind", "eagle", "--data", str(text), "--data",
                                      str(images), "--steps", "1", "--batch", "2"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "cli" / LOG_FILE).read_text())["data"] == log["data"]
