"""ViSpec's `official-llava15` image input: the drafter's rows as the official inference
builds them on LLaVA-1.5 (no image mask: <image> token embeddings, no adaptor, g = 0); the
default `adaptor` input is unchanged, and greedy output is exact in both modes."""
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from vispec.exporter.cli import cli
from vispec.exporter.drafters.checkpoint import load_drafter
from vispec.exporter.drafters.export import target_lm_head
from vispec.exporter.drafters.reference import reference_prefill, run_rows
from vispec.runtime.drafter_specs import ADAPTOR, IMAGE_INPUTS, OFFICIAL_LLAVA15
from vispec.runtime.drafters import open_drafter
from vispec.runtime.errors import VispecError
from vispec.runtime.generate import generate_plain
from vispec.runtime.masks import causal_mask
from vispec.runtime.pipeline import Pipeline
from vispec.runtime.specs import HIDDEN_STATES
from vispec.runtime.speculative import generate_speculative
from vispec.runtime.tree import TreeConfig

TREE = TreeConfig(total_tokens=10, depth=3, top_k=4)


@pytest.fixture
def llava(target_model, tiny_target, table_drafter):
    """Target, its model dir, and the ViSpec drafter with its own table (dir, artifacts)."""
    return target_model("llava"), tiny_target("llava")[0], table_drafter("vispec", "llava", "own")


def _target_pass(target, images):
    prompt = target.prepare("Describe both pictures.", images)
    embeds = target.prompt_embeds(prompt)
    positions, _ = target.glue.position_ids(prompt)
    out = target.step(target.new_cache(), embeds, positions, causal_mask(0, len(embeds)))
    return prompt.input_ids, embeds, out.hidden, int(out.logits[-1].argmax())


def _recorded_prefill(session, inputs):
    """Prefill, recording each draft call's positions and the drafter hidden states it
    returned; returns the top-k and (positions [N], hidden [N, H]) over all calls."""
    fed, call = [], session._draft

    def record(*args, **kwargs):
        out = call(*args, **kwargs)
        fed.append((args[3].copy(), out[HIDDEN_STATES][0].copy()))
        return out

    session._draft = record
    try:
        top = session.prefill(*inputs)
    finally:
        del session._draft
    return top, (np.concatenate([p for p, _ in fed]), np.concatenate([h for _, h in fed]))


def test_drafter_inputs_match_the_official_llava15_reference(llava, two_images):
    target, model_dir, (drafter_dir, artifacts) = llava
    inputs = _target_pass(target, two_images)
    drafter = load_drafter(drafter_dir, model_dir)
    with open_drafter(artifacts, target, image_input=OFFICIAL_LLAVA15) as session:
        top, (positions, hidden) = _recorded_prefill(session, inputs)
        assert not session.global_feature.any() and session.cache.length == len(inputs[0])
    ref = reference_prefill(drafter, target_lm_head(model_dir), target.glue, *inputs,
                            image_input=OFFICIAL_LLAVA15)
    np.testing.assert_allclose(hidden, ref.hidden.numpy(), rtol=1e-4, atol=1e-3)
    np.testing.assert_array_equal(positions, ref.positions.numpy())
    np.testing.assert_array_equal(top[1], ref.top_k(session.top_k)[1])
    # built the official way: the drafter's own embedding of every id, img_fc(cat(f, 0))
    ids, _, features, next_token = inputs
    e = drafter.embed_tokens(torch.as_tensor(np.append(ids[1:], next_token)))
    with torch.no_grad():
        official = drafter.fc(torch.cat([e, drafter.img_fc(torch.cat(
            [torch.as_tensor(features), torch.zeros_like(e)], -1))], -1))
        rows = run_rows(drafter, target_lm_head(model_dir), official, ref.positions)
    np.testing.assert_allclose(hidden, rows.hidden.numpy(), rtol=1e-4, atol=1e-3)


def test_default_keeps_the_adaptor(llava, two_images):
    target, model_dir, (drafter_dir, artifacts) = llava
    inputs = _target_pass(target, two_images)
    with open_drafter(artifacts, target) as session:
        assert session.image_input == ADAPTOR
        _, (positions, hidden) = _recorded_prefill(session, inputs)
        g = session.global_feature
    ref = reference_prefill(load_drafter(drafter_dir, model_dir), target_lm_head(model_dir),
                            target.glue, *inputs)
    assert len(positions) < len(inputs[0])  # image runs compressed to adaptor rows
    np.testing.assert_array_equal(positions, ref.positions.numpy())
    np.testing.assert_allclose(hidden, ref.hidden.numpy(), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(g, ref.global_feature.numpy(), rtol=1e-4, atol=1e-4)
    assert g.any()


@pytest.mark.parametrize("image_input", IMAGE_INPUTS)
def test_greedy_output_exact_in_both_modes(image_input, llava, two_images):
    target, _, (_, artifacts) = llava
    prompt = target.prepare("What is in the pictures?", two_images)
    plain = generate_plain(target, prompt, 24)
    with open_drafter(artifacts, target, image_input=image_input) as session:
        result = generate_speculative(target, session, prompt, 24, tree=TREE)
    assert result.tokens == plain.tokens


def test_refused_where_it_does_not_apply(target_model, table_drafter):
    llava_target = target_model("llava")
    with pytest.raises(VispecError, match="LLaVA-1.5 targets, not on 'qwen2_5_vl'"):
        open_drafter(table_drafter("vispec", "qwen2_5_vl", "copy")[1], target_model("qwen2_5_vl"),
                     image_input=OFFICIAL_LLAVA15)
    with pytest.raises(VispecError, match="does not apply to a eagle drafter"):
        open_drafter(table_drafter("eagle", "llava", "copy")[1], llava_target,
                     image_input=OFFICIAL_LLAVA15)
    with pytest.raises(VispecError, match="Expected one of"):
        open_drafter(table_drafter("vispec", "llava", "copy")[1], llava_target,
                     image_input="none")


def test_pipeline_and_cli_option(llava, tiny_target, noise_image, tmp_path):
    _, _, (_, artifacts) = llava
    target_dir = tiny_target("llava")[1]
    pipe = Pipeline(target_dir, drafter_dir=artifacts, tree=TREE,
                    drafter_image_input=OFFICIAL_LLAVA15)
    assert pipe.drafter.image_input == OFFICIAL_LLAVA15
    image = tmp_path / "image.png"
    noise_image(seed=5).save(image)
    result = pipe.generate("What is it?", images=[image], max_new_tokens=12)
    assert result.tokens == pipe.generate("What is it?", images=[image], max_new_tokens=12,
                                          draft=False).tokens
    done = CliRunner().invoke(cli, ["generate", "--model", str(target_dir), "--drafter",
                                    str(artifacts), "--drafter-image-input", OFFICIAL_LLAVA15,
                                    "--prompt", "What is it?", "--image", str(image),
                                    "--max-new-tokens", "8"])
    assert done.exit_code == 0, done.output
