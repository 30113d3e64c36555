"""A drafter's own token table (inside its draft graph) embeds x_L, tree tokens and accepted
tokens; a checkpoint without one takes the target's."""
import numpy as np
import pytest
from safetensors import safe_open

from vispec.exporter.drafters.checkpoint import load_drafter
from vispec.exporter.drafters.export import target_lm_head, validate_drafter
from vispec.exporter.drafters.reference import reference_prefill
from vispec.runtime.drafter_specs import DRAFT
from vispec.runtime.drafters import open_drafter
from vispec.runtime.generate import generate_plain
from vispec.runtime.masks import causal_mask
from vispec.runtime.speculative import draft, generate_speculative
from vispec.runtime.tree import TreeConfig

TREE = TreeConfig(total_tokens=10, depth=3, top_k=4)


@pytest.fixture
def sessions(table_drafter, target_model):
    """``sessions(*tables)``: ViSpec sessions on tiny LLaVA that differ only in the table."""
    target = target_model("llava")
    return lambda *tables: [open_drafter(table_drafter("vispec", "llava", t)[1], target)
                            for t in tables]


def _prefilled(target, session, images):
    prompt = target.prepare("Describe the picture.", images)
    embeds = target.prompt_embeds(prompt)
    positions, _ = target.glue.position_ids(prompt)
    out = target.step(target.new_cache(), embeds, positions, causal_mask(0, len(embeds)))
    next_token = int(out.logits[-1].argmax())
    top = session.prefill(prompt.input_ids, embeds, out.hidden, next_token)
    return (prompt.input_ids, embeds, out.hidden, next_token), top


@pytest.mark.parametrize("table", ["copy", "own", "none"])
def test_validate_checks_the_draft_graph_with_each_table(table, table_drafter, tiny_target):
    drafter_dir, artifacts = table_drafter("vispec", "llava", table)
    with safe_open(str(drafter_dir / "model.safetensors"), "pt") as f:
        assert ("embed_tokens.weight" in f.keys()) == (table != "none")
    rows = validate_drafter(drafter_dir, tiny_target("llava")[0], artifacts)
    assert {r.graph for r in rows} == {DRAFT, "adaptor"}
    assert all(r.passed for r in rows), [r for r in rows if not r.passed]


def test_drafts_follow_the_table(sessions, table_drafter, tiny_target, target_model,
                                 noise_image):
    """Same weights but the table: the drafter's own table matches the PyTorch reference
    and drafts differently from the target's table (which matches it with that table)."""
    target, model_dir = target_model("llava"), tiny_target("llava")[0]
    trees = {}
    for table, session in zip(("own", "none"), sessions("own", "none")):
        inputs, top = _prefilled(target, session, [noise_image(seed=3)])
        drafter = load_drafter(table_drafter("vispec", "llava", table)[0], model_dir)
        ref = reference_prefill(drafter, target_lm_head(model_dir), target.glue, *inputs)
        logp, ids = ref.top_k(session.top_k)
        np.testing.assert_array_equal(top[1], ids)
        np.testing.assert_allclose(top[0], logp, rtol=1e-4, atol=2e-4)
        trees[table] = top, draft(session, inputs[-1], top, TREE).tokens
    assert not np.allclose(trees["own"][0][0], trees["none"][0][0], atol=1e-3)
    assert trees["own"][1].tolist() != trees["none"][1].tolist()


def test_greedy_output_unchanged_with_an_own_table(sessions, target_model, noise_image):
    target, (session,) = target_model("llava"), sessions("own")
    prompt = target.prepare("What is in the picture?", [noise_image(seed=4)])
    plain = generate_plain(target, prompt, 24)
    assert generate_speculative(target, session, prompt, 24, tree=TREE).tokens == plain.tokens
