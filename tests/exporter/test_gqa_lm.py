"""The LM step in ONNX Runtime's fused CPU form (``export --attention gqa``): parity with
PyTorch, the same outputs as the standard graph, exact speculation, KV written in place,
and the places that refuse it."""
import collections

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from vispec.engines.build import BuildConfig, plan_build
from vispec.exporter.cli import cli
from vispec.exporter.export import export_target
from vispec.exporter.report import validate_all
from vispec.runtime.backends.ort import ort_memory
from vispec.runtime.drafters import open_drafter
from vispec.runtime.errors import ManifestError, VispecError
from vispec.runtime.generate import generate_plain, prefill
from vispec.runtime.manifest import Manifest
from vispec.runtime.masks import causal_mask
from vispec.runtime.pipeline import Pipeline
from vispec.runtime.session import Session
from vispec.runtime.specs import ATTENTION_MASK, INPUTS_EMBEDS, LOGIT_ROWS, LOGITS, POSITION_IDS
from vispec.runtime.target import TargetModel

MAX_LEN = 256


@pytest.fixture(scope="module")
def gqa_targets(tiny_target, tmp_path_factory):
    """(model_dir, standard float32 artifacts, gqa float32, gqa int4)."""
    model_dir, standard = tiny_target("llava")
    root = tmp_path_factory.mktemp("gqa")
    export_target(model_dir, root / "fp32", max_len=MAX_LEN, attention="gqa")
    export_target(model_dir, root / "int4", max_len=MAX_LEN, attention="gqa", weights="int4")
    return model_dir, standard, root / "fp32", root / "int4"


def test_the_gqa_graph_is_a_few_fused_nodes_a_layer(gqa_targets):
    _, standard, gqa, int4 = gqa_targets
    facts = Manifest.load(gqa).model
    assert facts["attention"] == "gqa" and Manifest.load(standard).model["attention"] == "standard"
    ops = collections.Counter(n.op_type for n in onnx.load(str(gqa / "lm.onnx")).graph.node)
    layers = facts["num_layers"]
    assert ops["GroupQueryAttention"] == layers and ops["SkipSimplifiedLayerNormalization"] == 2 * layers
    assert sum(ops.values()) <= 14 * layers + 8
    standard_nodes = len(onnx.load(str(standard / "lm.onnx")).graph.node)
    assert sum(ops.values()) * 3 < standard_nodes
    quantized = collections.Counter(n.op_type for n in onnx.load(str(int4 / "lm.onnx")).graph.node)
    assert quantized["MatMulNBits"] == 4 * layers + 1 and quantized["MatMul"] == 0  # + LM head


def test_gqa_graph_matches_pytorch_and_the_standard_graph(gqa_targets):
    model_dir, standard, gqa, _ = gqa_targets
    rows, checks = validate_all(model_dir, gqa, max_new_tokens=12)
    assert all(r.passed for r in rows), [r for r in rows if not r.passed]
    assert {r.case.split()[0] for r in rows if r.graph == "lm"} == {"prefill", "decode", "tree"}
    assert all(c.identical for c in checks)
    a, b = TargetModel(standard), TargetModel(gqa)
    prompt = a.prepare("Describe the boat.")
    embeds = a.prompt_embeds(prompt)
    positions, _ = a.glue.position_ids(prompt)
    outs = [t.step(t.new_cache(), embeds, positions, causal_mask(0, len(embeds)))
            for t in (a, b)]
    np.testing.assert_allclose(outs[1].logits, outs[0].logits, atol=1e-4, rtol=1e-4)


def test_kv_rows_land_in_place_and_compaction_moves_them(gqa_targets):
    """The graph writes the new rows at the cache's length in the head-major buffer;
    compaction after a tree moves them as the standard layout's would."""
    _, standard, gqa, _ = gqa_targets
    caches = []
    for art in (standard, gqa):
        target = TargetModel(art)
        cache = target.new_cache()
        embeds = target.embed(np.arange(5, 17))
        target.step(cache, embeds[:8], np.arange(8)[None], causal_mask(0, 8))
        cache.commit(8)
        mask = np.ones((1, 1, 4, 12), bool)
        mask[0, 0, :, 8:] = np.tril(np.ones((4, 4), bool))
        target.step(cache, embeds[8:], np.array([[8, 9, 9, 10]]), mask)
        cache.compact(np.array([8, 10, 11]), 8)
        caches.append(cache)
    assert caches[1].heads_major and caches[1].length == caches[0].length == 11
    np.testing.assert_allclose(caches[1].to_host()[:, :, :11], caches[0].to_host()[:, :, :11],
                               atol=1e-5)


def test_greedy_speculative_equals_plain_on_gqa_targets(gqa_targets, tiny_drafter,
                                                        assert_greedy_exact):
    _, _, gqa, int4 = gqa_targets
    for art in (gqa, int4):
        target = TargetModel(art)
        for kind in ("vispec", "hivis", "eagle"):
            assert_greedy_exact(target, open_drafter(tiny_drafter(kind, "llava")[1], target))


def test_session_reuses_a_gqa_cache_across_turns(gqa_targets):
    """Turn 2 prefills only its new rows after the cached ones (the graph's keys are the
    cache's first ``length`` rows) and equals generating it from scratch."""
    _, _, gqa, _ = gqa_targets
    target = TargetModel(gqa)
    user = lambda text: {"role": "user", "content": [{"type": "text", "text": text}]}  # noqa: E731
    first = [user("Name a colour.")]
    session = Session(target)
    reply = session.generate_plain(target.glue.prepare_chat(target.processor, first, []), 8)
    second = target.glue.prepare_chat(target.processor, first + [
        {"role": "assistant", "content": [{"type": "text", "text": reply.text}]},
        user("And another?")], [])
    result = session.generate_plain(second, 12)
    assert result.stats.reused_tokens > 0
    assert result.tokens == generate_plain(target, second, 12).tokens


def test_gqa_is_refused_where_it_cannot_run(gqa_targets, tiny_target, tmp_path):
    _, _, gqa, _ = gqa_targets
    with pytest.raises(ManifestError, match="fused CPU form.*Hint: export again with "
                                            "--attention standard"):
        TargetModel(gqa, memory=ort_memory("cpu"))
    with pytest.raises(VispecError, match="TensorRT cannot parse.*--attention standard"):
        plan_build(Manifest.load(gqa), gqa, BuildConfig(), "10.13")
    model_dir, _ = tiny_target("qwen2_5_vl")
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["export", str(model_dir), str(out), "--attention", "gqa"])
    assert result.exit_code == 2 and "M-RoPE" in result.output and not out.exists()
    assert "Hint: export with --attention standard" in result.output


def test_a_prefill_computes_the_last_rows_logits_only(gqa_targets):
    """``last_logits``: the LM head runs on the last row (what a prompt's first token needs);
    that row equals the full step's, and asking for another row is refused."""
    _, _, gqa, _ = gqa_targets
    target = TargetModel(gqa)
    embeds = target.embed(np.arange(3, 13))
    args = (embeds, np.arange(10)[None], causal_mask(0, 10))
    full = target.step(target.new_cache(), *args)
    last = target.step(target.new_cache(), *args, last_logits=True)
    assert full.logits.shape[0] == 10 and last.logits.shape[0] == 1
    np.testing.assert_array_equal(last.logits_row(-1), full.logits_row(9))
    np.testing.assert_array_equal(last.logits_row(9), full.logits_row(-1))
    np.testing.assert_array_equal(last.hidden, full.hidden)
    with pytest.raises(ValueError, match="from row 9 on"):
        last.logits_row(3)


def test_two_caches_interleaved_on_one_gqa_target(gqa_targets):
    """The KV slabs are bound once while one cache decodes (``held``); stepping two caches
    in turn, with one step bound the plain way (every buffer passed) between them, rebinds
    them: each conversation gets exactly the tokens it gets alone."""
    _, _, gqa, _ = gqa_targets
    target = TargetModel(gqa)
    prompts = [target.prepare(text) for text in ("Describe the boat.", "What is in the picture?")]
    alone = [generate_plain(target, p, 8).tokens for p in prompts]
    caches = [target.new_cache() for _ in prompts]
    states = [prefill(target, c, p) for c, p in zip(caches, prompts)]
    tokens = [[int(np.argmax(s.out.logits_row(-1)))] for s in states]
    positions = [s.next_position for s in states]
    for step in range(7):
        for i, cache in enumerate(caches):
            position_ids = target.glue.step_position_ids(positions[i], np.zeros(1, np.int64))
            mask = causal_mask(cache.length, 1)
            if step == 3 and i == 0:  # the unheld path: every KV view passed as a feed
                feeds = {INPUTS_EMBEDS: target.embed(tokens[i][-1:])[None],
                         POSITION_IDS: position_ids, ATTENTION_MASK: mask,
                         LOGIT_ROWS: np.zeros(1, np.int64), **cache.past()}
                logits = target.runners["lm"].infer(feeds, cache.present(1))[LOGITS][0, -1]
            else:
                logits = target.step_tokens(cache, tokens[i][-1:], position_ids, mask).logits_row(-1)
            cache.commit(1)
            positions[i] += 1
            tokens[i].append(int(np.argmax(logits)))
    assert tokens == alone


def test_quantized_targets_are_held_to_their_activation_rounding(gqa_targets):
    """Level-4 ``MatMulNBits`` rounds activations to int8: a tree row and the plain step's
    row may part by a rounding step, so such targets' ties are wider (``runtime.ties``)."""
    from vispec.runtime.ties import ROUNDED_ACTIVATIONS, TIE_TOLERANCE, tie_tolerance
    _, standard, gqa, int4 = gqa_targets
    assert tie_tolerance(TargetModel(int4)) == TIE_TOLERANCE[ROUNDED_ACTIVATIONS]
    assert tie_tolerance(TargetModel(gqa)) == tie_tolerance(TargetModel(standard)) == \
        TIE_TOLERANCE["float32"]


def test_a_drafter_less_lm_spins_between_steps_unless_a_screen_runs(gqa_targets, tiny_drafter):
    """``Pipeline`` keeps the LM's pool spinning between runs (ONNX Runtime's default) only
    where no other pooled session alternates with it: no drafter, no head screen, and not
    when told (serving workers share the cores). Either way the tokens are the same."""
    _, _, fp32, int4 = gqa_targets

    def stops(pipe):
        return {name: runner.session.get_session_options().get_session_config_entry(
                    "session.force_spinning_stop") for name, runner in pipe.target.runners.items()}

    alone, drafted = Pipeline(int4), Pipeline(int4, drafter_dir=tiny_drafter("eagle", "llava")[1])
    assert stops(alone) == {**stops(drafted), "lm": "0"} and set(stops(drafted).values()) == {"1"}
    screened = Pipeline(fp32)
    assert screened.target.screen is not None and set(stops(screened).values()) == {"1"}
    assert set(stops(Pipeline(int4, keep_spinning=False)).values()) == {"1"}  # workers
    tokens = [p.generate("Describe the boat.", max_new_tokens=8, draft=False).tokens
              for p in (alone, drafted)]
    assert tokens[0] == tokens[1]


def test_plain_greedy_steps_bound_once_decode_as_the_general_step(gqa_targets, tiny_drafter,
                                                                 monkeypatch):
    """``TargetModel.greedy_steps`` (int4 ``gqa``: a host table, no head screen) decodes the
    same tokens, K/V, positions and drafter features as ``step_tokens``; targets it does
    not serve say None."""
    _, standard, fp32, int4 = gqa_targets
    target = TargetModel(int4)
    assert target.greedy_steps(target.new_cache()) is not None
    for other in (TargetModel(fp32), TargetModel(standard)):  # a screen; no heads-major slabs
        assert other.greedy_steps(other.new_cache()) is None
    drafter = open_drafter(tiny_drafter("eagle", "llava")[1], target)
    prompt = target.prepare("Describe the boat.")
    fast = Session(target, drafter)
    fast_tokens = fast.generate_plain(prompt, 24).tokens
    monkeypatch.setattr(TargetModel, "greedy_steps", lambda self, cache: None)
    general = Session(target, drafter)
    assert general.generate_plain(prompt, 24).tokens == fast_tokens
    assert fast.position == general.position and fast.rows == general.rows
    n = fast.cache.length
    assert n == general.cache.length == len(fast.rows)
    np.testing.assert_array_equal(fast.cache.to_host()[:, :, :n], general.cache.to_host()[:, :, :n])
    np.testing.assert_array_equal(fast.features[:n], general.features[:n])
