"""``exact`` decoding: every pass after a prompt's has an even row count, so a row's
arithmetic does not depend on how rows are grouped into passes, and speculation verifies
chains only: greedy speculative output equals plain output bit for bit on a quantized
target (int4 in blocks of 64, whose kernel computes an odd pass's last row apart)."""
from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from vispec.runtime.errors import VispecError
from vispec.runtime.generate import prefill
from vispec.runtime.masks import causal_mask
from vispec.runtime.pipeline import Pipeline
from vispec.runtime.target import TargetModel
from vispec.runtime.tree import TreeConfig
from vispec.runtime.tree_policy import CHAINS, AutoTree

TOKENS = [5, 17, 9, 33, 2, 41]
SPLITS = ([6], [1] * 6, [3, 3], [1, 2, 3], [5, 1])


@pytest.fixture(scope="module")
def int4_target(tiny_target, tmp_path_factory):
    """The tiny LLaVA in int4 blocks of 64, ONNX Runtime's fused CPU form."""
    from vispec.exporter.export import export_target

    model_dir, _ = tiny_target("llava")
    out = tmp_path_factory.mktemp("exact") / "int4"
    export_target(model_dir, out, max_len=256, weights="int4", weights_block=64,
                  attention="gqa")
    return out


def _rows(target: TargetModel, splits) -> np.ndarray:
    """Final hidden states of ``TOKENS`` after a prompt, run in passes of ``splits`` rows."""
    cache = target.new_cache()
    prompt = target.prepare("Describe the weather.", [])
    position = prefill(target, cache, prompt).next_position
    rows, done = [], 0
    for n in splits:
        out = target.step_tokens(cache, np.array(TOKENS[done:done + n]),
                                 target.glue.step_position_ids(position + done, np.arange(n)),
                                 causal_mask(cache.length, n))
        rows.append(np.array(out.hidden))
        cache.commit(n)
        done += n
    return np.concatenate(rows)


def test_rows_do_not_depend_on_the_passes(int4_target):
    exact = TargetModel(int4_target, threads=2, exact=True)
    reference = _rows(exact, SPLITS[0])
    for splits in SPLITS[1:]:
        np.testing.assert_array_equal(_rows(exact, splits), reference, err_msg=str(splits))
    loose = TargetModel(int4_target, threads=2)  # the control: odd passes part
    assert any(not np.array_equal(_rows(loose, s), reference) for s in SPLITS[1:])


@pytest.mark.parametrize("kind", ["vispec", "eagle"])
def test_speculative_equals_plain_bit_for_bit(int4_target, tiny_drafter, noise_image, kind):
    _, drafter_dir = tiny_drafter(kind, "llava")
    pipe = Pipeline(int4_target, drafter_dir=drafter_dir, threads=2, exact=True)
    policy = pipe.tree_policy()
    assert isinstance(policy, AutoTree) and set(policy.trees) <= set(CHAINS)
    cases = [("Tell me about a lighthouse.", []), ("What is here?", [noise_image()])]
    for text, images in cases:
        plain = pipe.generate(text, images, max_new_tokens=40, draft=False).tokens
        for tree in (policy, TreeConfig(5, 3, 1)):
            assert pipe.generate(text, images, max_new_tokens=40, tree=tree).tokens == plain


def test_branched_trees_are_refused(int4_target, tiny_drafter):
    _, drafter_dir = tiny_drafter("eagle", "llava")
    with pytest.raises(VispecError, match="exact decoding verifies chains.*Hint: --top-k 1"):
        Pipeline(int4_target, drafter_dir=drafter_dir, tree=TreeConfig(4, 2, 2), exact=True)
    pipe = Pipeline(int4_target, drafter_dir=drafter_dir, tree=None, exact=True)
    assert pipe.tree_policy().top_k == 1  # the default tree is a chain


def test_cli_refuses_a_branched_tree(int4_target, tiny_drafter):
    from vispec.exporter.cli import cli

    _, drafter_dir = tiny_drafter("eagle", "llava")
    result = CliRunner().invoke(cli, ["generate", "--model", str(int4_target), "--drafter",
                                      str(drafter_dir), "--prompt", "Hi", "--exact",
                                      "--top-k", "2", "--depth", "2", "--total-tokens", "4"])
    assert result.exit_code == 2 and "verifies chains" in result.output
