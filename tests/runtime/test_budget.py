"""A generation that plain decoding can serve, speculation serves too: no tree-slot reserve,
the last rounds plain where a tree no longer fits, caches and calibration checked up front."""
import pytest

from vispec.runtime.drafters import open_drafter
from vispec.runtime.errors import ManifestError, PromptTooLongError, VispecError
from vispec.runtime.pipeline import Pipeline
from vispec.runtime.speculative import generate_speculative
from vispec.runtime.target import TargetModel
from vispec.runtime.tree import TreeConfig
from vispec.runtime.tree_calibration import CALIBRATION_TOKENS, calibration_prompt, usable_trees
from vispec.runtime.tree_policy import PlainDecoding


@pytest.fixture(scope="module")
def small_export(tmp_path_factory, tiny_target):
    """``small_export(family, max_len) -> (target dir, drafter dir)``: an EAGLE pair with a
    short cache."""
    from vispec.exporter.drafters.export import export_drafter
    from vispec.exporter.export import export_target
    from vispec.exporter.fixtures.drafters import build_tiny_drafter

    def get(family, max_len):
        model_dir, _ = tiny_target(family)
        root = tmp_path_factory.mktemp(f"{family}-{max_len}")
        export_target(model_dir, root / "target", max_len=max_len)
        ckpt = build_tiny_drafter("eagle", model_dir, root / "ckpt")
        export_drafter(ckpt, model_dir, root / "drafter", top_k=4, max_len=max_len)
        return root / "target", root / "drafter"

    return get


def test_speculation_serves_the_exact_cache_boundary(tiny_target, tiny_drafter):
    """The issue's reproducer: a 4,4,4 tree (16 drafter rows a round) up to the last slot."""
    target_dir, drafter_dir = tiny_target("llava")[1], tiny_drafter("eagle", "llava")[1]
    pipe = Pipeline(target_dir, drafter_dir=drafter_dir, tree=TreeConfig(4, 4, 4))
    budget = pipe.target.max_len - len(pipe.target.prepare("hi").input_ids)
    plain = pipe.generate("hi", max_new_tokens=budget, draft=False)
    spec = pipe.generate("hi", max_new_tokens=budget)
    assert spec.tokens == plain.tokens
    assert len(plain.tokens) == budget  # the tiny model meets no EOS: the cache is full
    assert spec.stats.rounds[0].tree == TreeConfig(4, 4, 4)
    assert spec.stats.rounds[-1].tree is None  # the last tokens came plainly


def test_budget_beyond_the_cache_is_refused_before_auto_measures(tiny_target, tiny_drafter):
    pipe = Pipeline(tiny_target("llava")[1], drafter_dir=tiny_drafter("eagle", "llava")[1])
    with pytest.raises(PromptTooLongError, match="max_len 256"):
        pipe.generate("sea " * 300, max_new_tokens=4)
    with pytest.raises(PromptTooLongError, match="lower --max-new-tokens"):
        pipe.generate("hi", max_new_tokens=250)
    assert pipe._policy is None  # nothing was measured


def test_drafter_with_a_shorter_cache_is_refused_at_load(small_export, tiny_target):
    _, drafter_dir = small_export("llava", 64)
    target = TargetModel(tiny_target("llava")[1])  # max_len 256
    with pytest.raises(ManifestError, match="--max-len 256"):
        open_drafter(drafter_dir, target)


def test_auto_calibrates_within_a_short_cache(small_export):
    """A 72-row Qwen export: the canned prompt is cut to fit, `auto` generates."""
    target_dir, drafter_dir = small_export("qwen2_5_vl", 72)
    pipe = Pipeline(target_dir, drafter_dir=drafter_dir)
    trees = usable_trees(pipe.target, pipe.drafter)
    prompt = calibration_prompt(pipe.target, trees)
    assert len(prompt.input_ids) + CALIBRATION_TOKENS + max(t.total_tokens for t in trees) <= 72
    budget = 72 - len(pipe.target.prepare("hi").input_ids)
    plain = pipe.generate("hi", max_new_tokens=budget, draft=False)
    assert pipe.generate("hi", max_new_tokens=budget).tokens == plain.tokens


def test_auto_without_room_for_any_tree_decodes_plainly(small_export):
    target_dir, drafter_dir = small_export("llava", 23)  # room for trees of 2 rows: none
    pipe = Pipeline(target_dir, drafter_dir=drafter_dir)
    assert isinstance(pipe.tree_policy(), PlainDecoding)
    result = pipe.generate("hi", max_new_tokens=4)
    assert result.tokens == pipe.generate("hi", max_new_tokens=4, draft=False).tokens
    assert all(r.tree is None for r in result.stats.rounds)


def test_tree_that_can_never_fit_is_refused(small_export):
    target_dir, drafter_dir = small_export("qwen2_5_vl", 72)
    target = TargetModel(target_dir)
    drafter = open_drafter(drafter_dir, target)
    prompt = target.prepare("hi")
    with pytest.raises(VispecError, match="lower --total-tokens"):
        generate_speculative(target, drafter, prompt, 4, tree=TreeConfig(80, 5, 4))
