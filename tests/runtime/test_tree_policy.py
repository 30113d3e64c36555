"""Cost-aware trees: the auto policy picks by measured cost and online acceptance, falls
back to plain decoding mid-generation, stays exact, and re-measures on another artifact or
machine."""
import os

import pytest

from vispec.runtime.generate import generate_plain
from vispec.runtime.pipeline import Pipeline
from vispec.runtime.speculative import generate_speculative
from vispec.runtime.tree import TreeConfig
from vispec.runtime.tree_calibration import auto_tree, calibration_key
from vispec.runtime.tree_policy import AutoTree, expected_tokens

SMALL, WIDE = TreeConfig(4, 2, 2), TreeConfig(16, 3, 4)
PROMPT = "Describe the red boat and what is around it."


def policy(small_ms=2.0, wide_ms=3.0, plain_ms=1.0, **kw) -> AutoTree:
    return AutoTree(round_ms={SMALL: small_ms, WIDE: wide_ms}, plain_ms=plain_ms, **kw)


def test_a_tree_that_cannot_win_is_never_tried():
    # 4 levels at most (5 tokens) for 6 plain steps: plain decoding from the start
    p = policy(small_ms=6.0, wide_ms=6.0)
    assert p.choose() is None and p.choose() is None


def test_acceptance_decides_between_trees_and_plain():
    accepting, rejecting = policy(wide_ms=2.2), policy()
    for _ in range(20):
        accepting.observe(WIDE, 4)
        rejecting.observe(WIDE, 0)
        rejecting.observe(SMALL, 0)
    assert accepting.choose() == WIDE   # 5 tokens in 2.2 ms beat 4 in 2.0 ms and 1 in 1.0
    assert rejecting.choose() is None
    assert rejecting.choose() is None  # fell back: plain for the rest of this generation
    rejecting.start()                  # the next generation weighs the past 0.8 as much
    assert rejecting.counts[WIDE].tried == 16


def test_a_losing_drafter_is_tried_less_than_once_per_generation():
    # round costs as measured on the ~100M target (1.55 and 2.1 plain steps)
    never = policy(small_ms=1.55, wide_ms=2.1)
    tried = 0
    for _ in range(12):
        never.start()
        while (tree := never.choose()) is not None:
            never.observe(tree, 0)
            tried += 1
    assert tried <= 7


def test_expected_tokens_counts_levels():
    assert expected_tokens(WIDE, 1.0) == 5 and expected_tokens(WIDE, 0.0) == 1
    assert expected_tokens(TreeConfig(3, 5, 1), 1.0) == 3  # two drafted tokens at most


@pytest.mark.parametrize("family,draft_vocab", [("llava", False), ("qwen2_5_vl", False),
                                                ("llava", True)])
def test_auto_is_exact_including_the_fall_back_to_plain(runtime_pair, draft_vocab_pair,
                                                         noise_image, family, draft_vocab):
    target, drafter = draft_vocab_pair(family, "vispec")[:2] if draft_vocab else \
        runtime_pair(family, "vispec")
    prompt = target.prepare(PROMPT, [noise_image(56, 56, 3)])
    plain = generate_plain(target, prompt, 40)
    # Cheap rounds first make trees attractive; a random drafter is then rejected until
    # the policy falls back to plain decoding in the middle of the generation.
    auto = policy(small_ms=1.2, wide_ms=1.5, optimism=2.0)
    spec = generate_speculative(target, drafter, prompt, 40, tree=auto)
    assert spec.tokens == plain.tokens
    kinds = [r.tree for r in spec.stats.rounds]
    assert kinds[0] is not None and kinds[-1] is None
    first_plain = kinds.index(None)
    assert all(k is None for k in kinds[first_plain:])
    assert sum(spec.stats.accepted) == len(spec.tokens) - 1


def test_calibration_is_cached_per_artifact_and_machine(tiny_target, tiny_drafter, tmp_path,
                                                       monkeypatch):
    monkeypatch.setenv("VISPEC_CACHE_DIR", str(tmp_path))
    _, drafter_dir = tiny_drafter("eagle", "llava", 0)
    pipe = Pipeline(tiny_target("llava")[1], drafter_dir=drafter_dir)
    said = []
    first = auto_tree(pipe.target, pipe.drafter, drafter_dir, said.append)
    assert said and all(t.top_k <= pipe.drafter.top_k for t in first.trees)
    assert first.plain_ms > 0 and all(ms > 0 for ms in first.round_ms.values())
    said.clear()
    again = auto_tree(pipe.target, pipe.drafter, drafter_dir, said.append)
    assert not said and again.round_ms == first.round_ms  # read back, not measured

    key = calibration_key(pipe.target, drafter_dir)
    pipe.target.threads = 1                                # another machine setting
    assert calibration_key(pipe.target, drafter_dir) != key
    pipe.target.threads = None
    graph = next(drafter_dir.glob("*.onnx"))
    stat = graph.stat()
    os.utime(graph, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # re-exported artifact
    assert calibration_key(pipe.target, drafter_dir) != key
    auto_tree(pipe.target, pipe.drafter, drafter_dir, said.append)
    assert said                                            # measured anew


def test_pipeline_auto_generates_what_plain_does(tiny_target, tiny_drafter):
    _, drafter_dir = tiny_drafter("hivis", "llava", 0)
    pipe = Pipeline(tiny_target("llava")[1], drafter_dir=drafter_dir)
    streamed = []
    spec = pipe.generate(PROMPT, max_new_tokens=24, on_tokens=streamed.extend)
    assert streamed == spec.tokens
    assert spec.tokens == pipe.generate(PROMPT, max_new_tokens=24, draft=False).tokens
    with pytest.raises(Exception, match="Expected: 'auto'"):
        Pipeline(tiny_target("llava")[1], tree="fast")
