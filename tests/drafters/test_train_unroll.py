"""Training-time test: the levels ``train.level_rows`` unrolls are the tree levels the
runtime drafts (ONNX Runtime drafter session: prefill to a row, then a chain of
``tree_step`` s), and training on them lifts the drafter's acceptance beyond level 0."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from vispec.exporter.drafters.checkpoint import load_drafter
from vispec.exporter.drafters.export import target_lm_head
from vispec.exporter.drafters.train import TrainConfig, level_rows, make_training_data
from vispec.exporter.loading import load_target
from vispec.runtime.drafters import open_drafter

pytestmark = pytest.mark.usefixtures("torch_one_thread")
LEVELS = 3


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
@pytest.mark.parametrize("kind", ["eagle", "vispec", "hivis"])
def test_levels_are_the_runtime_tree_levels(kind, family, tiny_target, tiny_drafter,
                                            target_model):
    model_dir, _ = tiny_target(family)
    drafter_dir, artifacts = tiny_drafter(kind, family)
    drafter, lm_head = load_drafter(drafter_dir, model_dir), target_lm_head(model_dir)
    _, glue = load_target(model_dir)
    sample = make_training_data(model_dir, TrainConfig(sequences=2, new_tokens=12))[1]
    assert (sample.ids == glue.image_token_id).any()  # rows after an image
    with torch.no_grad():
        levels = [(hidden, seen) for _, hidden, seen in
                  level_rows(drafter, glue, sample, lm_head, LEVELS)]
    assert len(levels) == LEVELS
    session = open_drafter(artifacts, target_model(family))
    first = levels[0][1]
    checked = 0
    for row in np.flatnonzero(levels[-1][1] >= 0)[-4:]:  # rows labelled at every level
        root = int(first[row])  # the root row sees x_root; the prompt ends before it
        assert [int(seen[row]) for _, seen in levels] == list(range(root, root + LEVELS))
        session.prefill(sample.ids[:root], sample.embeds[:root].numpy(),
                        sample.features[:root].numpy(), int(sample.ids[root]))
        for level in range(1, LEVELS):
            mask = np.ones((1, level), bool)  # the node and its ancestors of this round
            logp, ids = session.tree_step(sample.ids[root + level:root + level + 1],
                                          np.array([level - 2]), mask, level)
            want = torch.topk(torch.log_softmax(levels[level][0][row] @ lm_head.T, -1),
                              session.top_k)
            np.testing.assert_array_equal(ids[0], want.indices.numpy())
            np.testing.assert_allclose(logp[0], want.values.numpy(), rtol=1e-4, atol=2e-3)
            checked += 1
    assert checked == 4 * (LEVELS - 1)


def test_unrolled_training_lifts_deeper_levels(tiny_target):
    """Same steps and data: training levels 1-2 on the drafter's own hidden states fits
    level 2 (top-1 against the target on the training sequences) better than teacher
    forcing alone (the tiny target is random: little of it carries to held-out text)."""
    from vispec.exporter.drafters.checkpoint import new_drafter
    from vispec.exporter.drafters.train import fit

    model_dir, _ = tiny_target("llava")
    config = TrainConfig(steps=80, sequences=24, new_tokens=32, batch=4)
    train = make_training_data(model_dir, config)
    _, glue = load_target(model_dir)
    lm_head = target_lm_head(model_dir)
    top1 = {}
    for unroll in (1, LEVELS):
        drafter = new_drafter("eagle", model_dir)
        fit(drafter, lm_head, glue, train, replace(config, unroll=unroll))
        agree = rows = 0
        with torch.no_grad():
            for sample in train:
                *_, (_, hidden, seen) = level_rows(drafter, glue, sample, lm_head, LEVELS)
                keep = seen >= 0
                target = (sample.logits[seen[keep]]).argmax(-1)
                agree += int(((hidden[torch.as_tensor(keep)] @ lm_head.T).argmax(-1)
                              == target).sum())
                rows += int(keep.sum())
        top1[unroll] = agree / rows
    assert top1[LEVELS] > top1[1] + 0.025, top1  # measured 0.19 -> 0.24
