"""Tree verification: greedy against brute force and plain decoding, sampling is lossless."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vispec.runtime.acceptance import (
    Verification,
    accept_greedy,
    accept_sampling,
    accepted_tokens,
    target_probs,
)
from vispec.runtime.tree import DraftTree, TreeConfig, build_draft_tree


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def top_k(logits: np.ndarray, k: int):
    """Top-k (log-probs float32, ids) of the last axis."""
    logp = log_softmax(logits).astype(np.float32)
    ids = np.argsort(-logp, axis=-1, kind="stable")[..., :k]
    return np.take_along_axis(logp, ids, axis=-1), ids


def bigram_tree(root: int, draft: np.ndarray, config: TreeConfig) -> DraftTree:
    """Draft tree of a fake drafter whose next-token logits are ``draft[last token]``."""

    def step(tokens, parent_rows, mask, level):
        return top_k(draft[tokens], config.top_k)

    first_logp, first_ids = top_k(draft[root], config.top_k)
    return build_draft_tree(root, first_logp, first_ids, step, config)


@st.composite
def greedy_cases(draw):
    """A tree over a tiny vocabulary and target logits often agreeing with the draft."""
    k, depth, vocab = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(3, 5))
    config = TreeConfig(draw(st.integers(2, 1 + k + depth * k * k)), depth, k)
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    tree = bigram_tree(0, rng.normal(size=(vocab, vocab)), config)
    logits = rng.normal(size=(len(tree.tokens), vocab))
    for node in np.flatnonzero(rng.random(len(tree.tokens)) < 0.7):
        kids = np.flatnonzero(tree.parents == node)
        if len(kids):  # make the target's argmax one of the node's children
            logits[node, tree.tokens[rng.choice(kids)]] += 10
    return tree, logits


def brute_force_greedy(tree: DraftTree, logits: np.ndarray) -> tuple[list[int], int]:
    best: list[int] = [0]
    for row in tree.paths:  # first path wins ties
        accepted = [0]
        for node in row[1:]:
            if node < 0 or tree.tokens[node] != np.argmax(logits[accepted[-1]]):
                break
            accepted.append(int(node))
        if len(accepted) > len(best):
            best = accepted
    return best, int(np.argmax(logits[best[-1]]))


@settings(max_examples=200, deadline=None)
@given(greedy_cases())
def test_greedy_matches_brute_force(case):
    tree, logits = case
    verification = accept_greedy(tree, logits)
    accepted, bonus = brute_force_greedy(tree, logits)
    assert verification.accepted.dtype == np.int64
    assert verification.accepted.tolist() == accepted and verification.next_token == bonus
    # Independent of paths: as deep as the deepest node whose whole path is correct.
    correct = np.ones(len(tree.tokens), bool)
    for node in range(1, len(tree.tokens)):
        parent = tree.parents[node]
        ok = tree.tokens[node] == np.argmax(logits[parent])
        correct[node] = correct[parent] and ok
    assert len(accepted) == tree.depths[correct].max() + 1
    emitted = accepted_tokens(tree, verification)
    assert emitted.tolist() == tree.tokens[accepted[1:]].tolist() + [bonus]


def plain_and_speculative(seed: int, noise: float, config: TreeConfig, length: int = 40):
    """Greedy decoding of a trigram target, plainly and with draft trees: (plain, spec, rounds)."""
    vocab = 7
    rng = np.random.default_rng(seed)
    bigram = 2 * rng.normal(size=(vocab, vocab))
    trigram = bigram + rng.normal(size=(vocab, vocab, vocab))  # [V, V, V] mostly bigram
    draft = bigram + noise * rng.normal(size=(vocab, vocab))

    plain = [1, 2]
    while len(plain) < length:
        plain.append(int(np.argmax(trigram[plain[-2], plain[-1]])))

    speculative, rounds = [1, 2], 0
    while len(speculative) < length:
        tree = bigram_tree(speculative[-1], draft, config)
        before = np.where(tree.parents >= 0, tree.tokens[tree.parents], speculative[-2])
        logits = trigram[before, tree.tokens]  # [T, V] target logits at every node
        speculative += accepted_tokens(tree, accept_greedy(tree, logits)).tolist()
        rounds += 1
    return plain, speculative[:length], rounds


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    noise=st.sampled_from([0.0, 0.5, 2.0, 100.0]),
    shape=st.sampled_from([(2, 1, 1), (6, 2, 2), (10, 3, 2), (20, 4, 3)]),
)
def test_greedy_tree_decoding_equals_plain_greedy(seed, noise, shape):
    plain, speculative, _ = plain_and_speculative(seed, noise, TreeConfig(*shape))
    assert speculative == plain


def test_greedy_tree_decoding_accepts_drafts():
    """The equality above is not vacuous: a good drafter gets most tokens accepted."""
    rounds = [plain_and_speculative(seed, 0.0, TreeConfig(20, 4, 3))[2] for seed in range(10)]
    assert sum(rounds) < 10 * 38 / 2


def chi2_critical(df: int, z: float = 4.75) -> float:
    """Wilson-Hilferty upper quantile of chi-square(df); z = 4.75 is about 1e-6."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi2(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """Pearson statistic and degrees of freedom over the cells with probability > 0."""
    assert counts[probs == 0].sum() == 0, "drew a token the target cannot produce"
    expected = probs[probs > 0] * counts.sum()
    assert expected.min() >= 5
    return float(((counts[probs > 0] - expected) ** 2 / expected).sum()), len(expected) - 1


def sampling_case(seed: int, vocab: int = 6):
    """A tree with duplicate siblings and target logits at every node."""
    rng = np.random.default_rng(seed)
    tree = bigram_tree(0, rng.normal(size=(vocab, vocab)), TreeConfig(12, 3, 3))
    tokens = tree.tokens.copy()
    tokens[2] = tokens[1]  # siblings sharing a token
    tree = DraftTree(tokens, tree.parents, tree.depths, tree.mask, tree.paths)
    assert tree.parents[2] == tree.parents[1] == 0
    return tree, rng.normal(size=(len(tokens), vocab))


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 1.0), (1.3, 0.8)])
def test_sampling_first_token_follows_target(temperature, top_p):
    tree, logits = sampling_case(seed=1)
    rng = np.random.default_rng(2)
    first = [
        accepted_tokens(tree, accept_sampling(tree, logits, temperature, rng, top_p))[0]
        for _ in range(20_000)
    ]
    counts = np.bincount(first, minlength=logits.shape[1])
    probs = target_probs(logits[0], temperature, top_p)
    statistic, df = chi2(counts, probs)
    assert statistic < chi2_critical(df)
    # The test has power: the same draws reject 3% of the mass moved between two tokens.
    wrong = probs.copy()
    wrong[np.argmax(probs)] -= 0.03
    wrong[np.argmin(np.where(probs > 0, probs, 1))] += 0.03
    assert chi2(counts, wrong)[0] > chi2_critical(df)


def test_sampling_two_tokens_over_rounds_follow_target():
    """Joint law of the first two emitted tokens, across round boundaries."""
    vocab, draws, temperature = 5, 20_000, 0.9
    rng = np.random.default_rng(3)
    bigram = 0.5 * rng.normal(size=(vocab, vocab))
    draft = bigram + rng.normal(size=(vocab, vocab))
    trees = [bigram_tree(root, draft, TreeConfig(8, 2, 2)) for root in range(vocab)]
    counts = np.zeros((vocab, vocab), np.int64)
    for _ in range(draws):
        emitted = [0]
        while len(emitted) < 3:
            tree = trees[emitted[-1]]
            verification = accept_sampling(tree, bigram[tree.tokens], temperature, rng)
            emitted += accepted_tokens(tree, verification).tolist()
        counts[emitted[1], emitted[2]] += 1
    probs = np.stack([target_probs(row, temperature) for row in bigram])  # [V, V]
    joint = probs[0][:, None] * probs  # p(a | 0) p(b | a)
    statistic, df = chi2(counts.ravel(), joint.ravel())
    assert statistic < chi2_critical(df)


def test_sampling_is_reproducible_with_a_seed():
    tree, logits = sampling_case(seed=4)

    def run(seed: int) -> list[tuple[tuple[int, ...], int]]:
        rng = np.random.default_rng(seed)
        results = [accept_sampling(tree, logits, 0.8, rng) for _ in range(200)]
        return [(tuple(v.accepted.tolist()), v.next_token) for v in results]

    assert run(5) == run(5)
    assert run(5) != run(6)


def test_sampling_path_is_a_chain_from_the_root():
    tree, logits = sampling_case(seed=5)
    rng = np.random.default_rng(0)
    for _ in range(200):
        accepted = accept_sampling(tree, logits, 1.0, rng).accepted
        assert accepted[0] == 0
        assert (tree.parents[accepted[1:]] == accepted[:-1]).all()


@given(logits=st.lists(st.floats(-5, 5), min_size=1, max_size=8), top_p=st.floats(0.01, 0.99))
def test_top_p_keeps_the_smallest_nucleus(logits, top_p):
    p = target_probs(np.array(logits), 1.0)
    filtered = target_probs(np.array(logits), 1.0, top_p)
    kept = np.flatnonzero(filtered)
    assert np.allclose(filtered[kept], p[kept] / p[kept].sum())
    assert p[kept].min() >= np.delete(p, kept).max(initial=0)  # the most likely tokens
    assert p[kept].sum() >= top_p - 1e-12  # hold top_p
    assert p[kept].sum() - p[kept].min() < top_p + 1e-12  # and no fewer would


def test_inputs_are_checked():
    tree, logits = sampling_case(seed=0)
    with pytest.raises(ValueError, match="target_logits"):
        accept_greedy(tree, logits[:-1])
    with pytest.raises(ValueError, match="temperature"):
        accept_sampling(tree, logits, 0.0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="top_p"):
        accept_sampling(tree, logits, 1.0, np.random.default_rng(0), top_p=0.0)
    assert isinstance(accept_greedy(tree, logits), Verification)
