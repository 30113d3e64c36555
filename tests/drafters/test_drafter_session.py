"""The numpy drafter sessions match the full-sequence PyTorch reference of each drafter."""
import json
import shutil

import numpy as np
import pytest
import torch

from vispec.exporter.drafters.checkpoint import load_drafter
from vispec.exporter.drafters.export import target_lm_head
from vispec.exporter.drafters.reference import reference_prefill, run_rows
from vispec.runtime.drafters import open_drafter
from vispec.runtime.errors import ManifestError
from vispec.runtime.masks import causal_mask
from vispec.runtime.target import TargetModel
from vispec.runtime.tree import TreeConfig, build_draft_tree

# (kind, target family, drafter's embed_tokens: copy of the target's | own | none)
CASES = [(kind, family, "copy") for kind in ("eagle", "vispec", "hivis")
         for family in ("llava", "qwen2_5_vl")]
CASES += [("vispec", "llava", "own"), ("hivis", "qwen2_5_vl", "own"), ("eagle", "llava", "none")]


class Generation:
    """A prompt with two images run through the target, plus the drafter's PyTorch reference."""

    def __init__(self, target, drafter_dir, model_dir, images):
        prompt = target.prepare("Describe both pictures.", images)
        self.target, self.ids = target, prompt.input_ids
        self.embeds = target.prompt_embeds(prompt)
        positions, self.target_next = target.glue.position_ids(prompt)
        self.cache = target.new_cache()
        out = target.step(self.cache, self.embeds, positions, causal_mask(0, len(self.ids)))
        self.cache.commit(len(self.ids))
        self.features, self.next_token = out.hidden, int(out.logits[-1].argmax())
        self.drafter = load_drafter(drafter_dir, model_dir)
        self.lm_head = target_lm_head(model_dir)

    def reference(self):
        return reference_prefill(self.drafter, self.lm_head, self.target.glue, self.ids,
                                 self.embeds, self.features, self.next_token)

    def accept(self, drafted: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Target over the root and ``drafted``: features at them, tokens incl. the bonus."""
        tokens = [self.next_token, *drafted]
        embeds = self.target.embed(tokens)
        positions = self.target.glue.step_position_ids(self.target_next, np.arange(len(tokens)))
        out = self.target.step(self.cache, embeds, positions,
                               causal_mask(self.cache.length, len(tokens)))
        self.cache.commit(len(tokens))
        self.ids = np.concatenate([self.ids, tokens])
        # the drafter embeds generated tokens with its own table (the prompt keeps the target's)
        own = self.drafter.embed_tokens(torch.as_tensor(tokens)).detach().numpy()
        self.embeds = np.concatenate([self.embeds, own])
        self.features = np.concatenate([self.features, out.hidden])
        self.target_next += len(tokens)
        self.next_token = int(out.logits[-1].argmax())
        return out.hidden, np.array([*drafted, self.next_token])


@pytest.fixture(params=CASES, ids=["-".join(c) for c in CASES])
def generation(request, table_drafter, tiny_target, target_model, two_images):
    kind, family, table = request.param
    drafter_dir, artifacts = table_drafter(kind, family, table)
    target = target_model(family)
    gen = Generation(target, drafter_dir, tiny_target(family)[0], two_images)
    return gen, open_drafter(artifacts, target)


def assert_same_top_k(got, reference_rows, k):
    logp, ids = reference_rows.top_k(k)
    np.testing.assert_array_equal(got[1], ids)
    np.testing.assert_allclose(got[0], logp, rtol=1e-4, atol=2e-4)


def test_prefill_matches_reference(generation):
    gen, session = generation
    top = session.prefill(gen.ids, gen.embeds, gen.features, gen.next_token)
    ref = gen.reference()
    assert_same_top_k(top, ref, session.top_k)
    assert session.next_position == int(ref.positions[-1]) + 1
    assert session.cache.length == len(ref.positions)
    if session.kind == "vispec":  # each of the two images -> num_q - 1 rows
        images = int(np.sum(gen.ids == gen.target.glue.image_token_id))
        assert session.cache.length == len(gen.ids) - images + 2 * (session.facts["num_q"] - 1)


def test_tree_steps_match_reference(generation):
    gen, session = generation
    logp, ids = session.prefill(gen.ids, gen.embeds, gen.features, gen.next_token)
    ref, k = gen.reference(), session.top_k
    level1 = session.tree_step(ids, np.full(k, -1), np.eye(k, dtype=bool), 1)
    children = level1[1][:, 0]  # each node's best child
    level2 = session.tree_step(children, np.arange(k), np.eye(k, k * 2, dtype=bool)
                               | np.eye(k, k * 2, k, dtype=bool), 2)
    first = _tree_reference(gen, ref, [], ids, ref.hidden[-1:].expand(k, -1), 1)
    second = _tree_reference(gen, ref, [first], children, first.hidden[-k:], 2)
    for got, want in ((level1, first), (level2, second)):
        top = torch.topk(want.logp[-k:], k, dim=-1)
        np.testing.assert_array_equal(got[1], top.indices.numpy())
        # tree rows feed the drafter's own hidden back (|h| ~ 100 in random drafters):
        # fp32 ORT-vs-torch differences of ~1e-5 relative reach ~1e-3 in the log-probs
        np.testing.assert_allclose(got[0], top.values.numpy(), rtol=1e-4, atol=2e-3)


@torch.no_grad()
def _tree_reference(gen, ref, earlier, tokens, parent_hidden, level):
    """Prefix rows + this round's tree rows (node j of level l sees its own chain)."""
    drafter, k = gen.drafter, len(tokens)
    embeds = drafter.embed_tokens(torch.as_tensor(tokens))
    fused = drafter.fuse(embeds[None], parent_hidden[None],
                         drafter.level_extra(level, ref.global_feature))[0]
    tree_fused = torch.cat([*(e.fused[-k:] for e in earlier), fused])
    n, t = len(ref.positions), len(tree_fused)
    mask = torch.zeros(n + t, n + t, dtype=torch.bool)
    mask[:n, :n] = torch.ones(n, n).tril().bool()
    mask[n:, :n] = True
    for row in range(t):  # level-l node j descends from node j of every earlier level
        mask[n + row, n + row % k::k][: row // k + 1] = True
    positions = torch.cat([ref.positions, ref.positions[-1] + 1 + torch.arange(t) // k])
    return run_rows(drafter, gen.lm_head, torch.cat([ref.fused, tree_fused]), positions, mask)


def test_rounds_match_full_sequence_reference(generation):
    gen, session = generation
    logp, ids = session.prefill(gen.ids, gen.embeds, gen.features, gen.next_token)
    config = TreeConfig(total_tokens=10, depth=3, top_k=session.top_k)
    for _ in range(2):
        tree = build_draft_tree(gen.next_token, logp, ids, session.tree_step, config)
        path = [int(tree.tokens[n]) for n in tree.paths[0][1:3] if n >= 0]
        features, tokens = gen.accept(path)
        logp, ids = session.advance(features, tokens)
        assert_same_top_k((logp, ids), gen.reference(), session.top_k)


def test_refuses_other_target(tiny_drafter, target_model):
    _, artifacts = tiny_drafter("eagle", "llava")
    with pytest.raises(ManifestError, match="exported for a target"):
        open_drafter(artifacts, target_model("qwen2_5_vl"))
    with pytest.raises(ManifestError, match="not a drafter"):
        open_drafter(target_model("llava").dir, target_model("llava"))


def test_a_vispec_graph_with_one_global_feature_a_call_is_refused(tiny_drafter, tiny_target,
                                                                  tmp_path):
    # exports before the per-row global feature took g [1, H]: re-export, says the error
    _, artifacts = tiny_drafter("vispec", "llava")
    old = shutil.copytree(artifacts, tmp_path / "old")
    manifest = json.loads((old / "manifest.json").read_text())
    [g] = [t for t in manifest["graphs"]["draft"]["spec"]["inputs"] if t["name"] == "global_feature"]
    g["shape"] = [1, g["shape"][-1]]
    (old / "manifest.json").write_text(json.dumps(manifest))
    target = TargetModel(tiny_target("llava")[1])
    with pytest.raises(ManifestError, match="older form.*export-drafter"):
        open_drafter(old, target)
