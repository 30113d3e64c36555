"""The speculative loop is exact: greedy output == plain greedy for every drafter type and
family, whatever the tree or drafter weights; sampling keeps the target's distribution."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vispec.exporter.fixtures.models import FAMILIES
from vispec.runtime.acceptance import target_probs
from vispec.runtime.drafter_specs import DRAFTER_TYPES
from vispec.runtime.generate import generate_plain
from vispec.runtime.masks import causal_mask
from vispec.runtime.sampling import Sampling
from vispec.runtime.speculative import generate_speculative
from vispec.runtime.tree import TreeConfig

WORDS = "the red boat sails over a calm sea while birds fly and a child waves".split()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", DRAFTER_TYPES)
def test_greedy_speculative_equals_plain(runtime_pair, noise_image, family, kind):
    target, drafter = runtime_pair(family, kind)
    for images in ([], [noise_image(56, 56, 3)], [noise_image(56, 84, 4), noise_image(56, 56, 5)]):
        prompt = target.prepare("Describe the red boat and what is around it.", images)
        plain = generate_plain(target, prompt, 24)
        for tree in (TreeConfig(8, 2, 2), TreeConfig(20, 3, 4)):
            spec = generate_speculative(target, drafter, prompt, 24, tree=tree)
            assert spec.tokens == plain.tokens
            assert spec.stats.target_passes <= plain.stats.target_passes
            assert sum(spec.stats.accepted) == len(spec.tokens) - 1


@st.composite
def tree_configs(draw):
    depth = draw(st.integers(1, 4))
    top_k = draw(st.integers(1, 4))
    total = draw(st.integers(2, min(40, 1 + top_k + depth * top_k ** 2)))
    return TreeConfig(total, depth, top_k)


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(family=st.sampled_from(FAMILIES), kind=st.sampled_from(DRAFTER_TYPES),
       seed=st.integers(0, 2), tree=tree_configs(), n_words=st.integers(1, 30),
       with_image=st.booleans(), max_new=st.integers(1, 40))
def test_property_identity_over_random_trees_drafters_and_prompts(
        runtime_pair, noise_image, family, kind, seed, tree, n_words, with_image, max_new):
    target, drafter = runtime_pair(family, kind, seed)
    rng = np.random.default_rng(n_words)
    text = " ".join(rng.choice(WORDS, n_words))
    prompt = target.prepare(text, [noise_image(56, 56, n_words)] if with_image else [])
    plain = generate_plain(target, prompt, max_new)
    assert generate_speculative(target, drafter, prompt, max_new, tree=tree).tokens == plain.tokens


def test_sampling_is_reproducible_with_a_seed(runtime_pair):
    target, drafter = runtime_pair("llava", "eagle")
    prompt = target.prepare("Tell me about the sea.")
    runs = [generate_speculative(target, drafter, prompt, 16, tree=TreeConfig(10, 2, 3),
                                 sampling=Sampling(temperature=0.8, seed=s)).tokens
            for s in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def _chi_square_rejects(counts: np.ndarray, expected: np.ndarray) -> bool:
    """Pearson test at p ~ 1e-4 (Wilson-Hilferty critical value); sparse bins pooled."""
    order = np.argsort(expected)
    small = order[np.cumsum(expected[order]) < 5]
    keep = np.setdiff1d(np.arange(len(expected)), small)
    obs = np.append(counts[keep], counts[small].sum())
    exp = np.append(expected[keep], expected[small].sum())
    stat = float(np.sum((obs - exp) ** 2 / np.maximum(exp, 1e-12)))
    df = len(obs) - 1
    z = 3.72  # one-sided normal quantile of 1e-4
    critical = df * (1 - 2 / (9 * df) + z * np.sqrt(2 / (9 * df))) ** 3
    return stat > critical


@pytest.mark.parametrize("draft_vocab", [False, True])
def test_speculative_sampling_keeps_the_target_distribution(runtime_pair, draft_vocab_pair,
                                                            draft_vocab):
    """Tokens 1 and 2 of many seeded speculative runs vs the target's own distributions:
    token 1 ~ p(. | prompt); token 2 (drafted tree, accepted or bonus) ~ p(. | prompt, x1);
    also with a draft vocabulary (drafts limited to part of the target's tokens)."""
    target, drafter = draft_vocab_pair("llava", "eagle")[:2] if draft_vocab else \
        runtime_pair("llava", "eagle")
    prompt = target.prepare("Tell me about the sea.")
    draws = 1500
    runs = [generate_speculative(target, drafter, prompt, 2, tree=TreeConfig(12, 2, 4),
                                 sampling=Sampling(temperature=1.0, seed=i)).tokens
            for i in range(draws)]
    first = np.array([r[0] for r in runs])
    pairs = np.array([r for r in runs if len(r) == 2])  # the others stopped at EOS
    vocab = target.facts["vocab_size"]
    cache = target.new_cache()
    prefix = target.step(cache, target.prompt_embeds(prompt),
                         np.arange(len(prompt.input_ids))[None],
                         causal_mask(0, len(prompt.input_ids)))
    cache.commit(len(prompt.input_ids))
    p1 = target_probs(prefix.logits[-1], 1.0)
    expected2 = np.zeros(vocab)
    for x1, count in zip(*np.unique(pairs[:, 0], return_counts=True)):
        out = target.step(cache, target.embed([x1]), np.array([[cache.length]]),
                          causal_mask(cache.length, 1))
        expected2 += count * target_probs(out.logits[-1], 1.0)
    counts1 = np.bincount(first, minlength=vocab)
    counts2 = np.bincount(pairs[:, 1], minlength=vocab)
    assert not _chi_square_rejects(counts1, draws * p1)
    assert not _chi_square_rejects(counts2, expected2)
    # the test has power: a distribution tilted towards the drafter's favourite fails
    assert _chi_square_rejects(counts2, 0.5 * expected2 + 0.5 * draws * np.eye(vocab)[
        int(np.argmax(expected2))])


def test_default_trees_fit_the_backend():
    from vispec.runtime.tree_policy import CPU_TREE, default_tree
    assert default_tree("vispec", "ort") == CPU_TREE
    assert default_tree("vispec", "ort-cuda") == TreeConfig(30, 3, 8)
    assert default_tree("hivis", "tensorrt") == TreeConfig(60, 5, 10)
    assert default_tree("eagle", "ort", total_tokens=10, depth=2) == TreeConfig(10, 2, 4)
