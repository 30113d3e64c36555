"""EAGLE-2 draft tree: invariants, and equality with a slow loop-based reference."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vispec.runtime.tree import DraftTree, TreeConfig, build_draft_tree


def children(path: tuple[int, ...], k: int, vocab: int, seed: int, coarse: bool):
    """A fake drafter's top-k after ``path`` (a pure function of the path).

    ``coarse``: log-probs on a 0.5 grid including 0 (ties everywhere, children scoring
    as much as their parent) and ids drawn with replacement (duplicate siblings).
    """
    rng = np.random.default_rng([seed, len(path), *path])
    if coarse:
        logp = -0.5 * rng.integers(0, 4, size=k)
        return logp.astype(np.float32), rng.integers(vocab, size=k)
    z = rng.normal(size=vocab) * 2
    logp = (z - z.max() - np.log(np.exp(z - z.max()).sum())).astype(np.float32)
    ids = np.argsort(-logp, kind="stable")[:k]
    return logp[ids], ids


class PathDrafter:
    """Implements DraftStep from ``children``; asserts the step inputs describe the tree."""

    def __init__(self, k: int, vocab: int, seed: int, coarse: bool):
        self.k, self.vocab, self.seed, self.coarse = k, vocab, seed, coarse
        self.paths: list[tuple[int, ...]] = []  # drafted tokens root..row, per fed row
        self.attends: list[set[int]] = []  # rows each fed row attends to, itself included
        self.levels: list[int] = []

    def __call__(self, tokens, parent_rows, mask, level):
        k, r = self.k, len(self.paths)
        assert tokens.shape == parent_rows.shape == (k,) and mask.shape == (k, r + k)
        assert mask.dtype == bool and (mask[:, r:] == np.eye(k, dtype=bool)).all()
        assert level == len(self.levels) + 1
        outputs = []
        for j in range(k):
            parent = int(parent_rows[j])
            assert -1 <= parent < r
            above = self.attends[parent] if parent >= 0 else set()
            assert set(np.flatnonzero(mask[j, :r]).tolist()) == above
            path = (self.paths[parent] if parent >= 0 else ()) + (int(tokens[j]),)
            assert len(path) == level
            outputs.append(children(path, k, self.vocab, self.seed, self.coarse))
            self.paths.append(path)  # row r + j
            self.attends.append(above | {r + j})
        self.levels.append(level)
        logp, ids = zip(*outputs)
        return np.stack(logp), np.stack(ids).astype(np.int64)


def reference_tree(root: int, config: TreeConfig, vocab: int, seed: int, coarse: bool):
    """EAGLE-2 selection written with plain loops: (tokens, parents) of the tree."""
    k = config.top_k
    first_logp, first_ids = children((), k, vocab, seed, coarse)
    # candidate: (score, token, parent candidate or -1, path)
    cands = [(first_logp[i], int(first_ids[i]), -1, (int(first_ids[i]),)) for i in range(k)]
    current = list(range(k))
    for _ in range(config.depth):
        new = []
        for c in current:
            score, _, _, path = cands[c]
            logp, ids = children(path, k, vocab, seed, coarse)
            for lp, tok in zip(logp, ids):
                new.append((score + min(lp, np.float32(0)), int(tok), c, path + (int(tok),)))
        ranked = sorted(range(len(new)), key=lambda i: (-new[i][0], i))[:k]
        current = [len(cands) + i for i in ranked]
        cands += new
    best = sorted(range(len(cands)), key=lambda i: (-cands[i][0], i))
    chosen = sorted(best[: config.total_tokens - 1])
    tokens = [root] + [cands[c][1] for c in chosen]
    parents = [-1] + [chosen.index(cands[c][2]) + 1 if cands[c][2] >= 0 else 0 for c in chosen]
    return tokens, parents


@st.composite
def tree_cases(draw):
    k = draw(st.integers(1, 4))
    depth = draw(st.integers(1, 4))
    total = draw(st.integers(2, 1 + k + depth * k * k))
    vocab = draw(st.integers(k, 12))
    return TreeConfig(total, depth, k), vocab, draw(st.integers(0, 2**16)), draw(st.booleans())


def build(root: int, config: TreeConfig, vocab: int, seed: int, coarse: bool) -> DraftTree:
    first_logp, first_ids = children((), config.top_k, vocab, seed, coarse)
    drafter = PathDrafter(config.top_k, vocab, seed, coarse)
    tree = build_draft_tree(root, first_logp, first_ids, drafter, config)
    assert drafter.levels == list(range(1, config.depth + 1))
    return tree


@settings(max_examples=150, deadline=None)
@given(tree_cases())
def test_tree_matches_reference(case):
    config, vocab, seed, coarse = case
    tree = build(7, config, vocab, seed, coarse)
    tokens, parents = reference_tree(7, config, vocab, seed, coarse)
    assert tree.tokens.tolist() == tokens
    assert tree.parents.tolist() == parents


@settings(max_examples=150, deadline=None)
@given(tree_cases())
def test_tree_invariants(case):
    config, vocab, seed, coarse = case
    tree = build(3, config, vocab, seed, coarse)
    n = config.total_tokens
    for name in ("tokens", "parents", "depths", "paths"):
        assert getattr(tree, name).dtype == np.int64, name
    assert tree.tokens.shape == tree.parents.shape == tree.depths.shape == (n,)
    assert tree.tokens[0] == 3 and tree.parents[0] == -1 and tree.depths[0] == 0
    assert (tree.parents[1:] < np.arange(1, n)).all() and (tree.parents[1:] >= 0).all()
    assert (tree.depths[1:] == tree.depths[tree.parents[1:]] + 1).all()
    assert tree.depths.max() <= config.depth + 1

    ancestors = np.eye(n, dtype=bool)
    for i in range(1, n):
        j = i
        while j > 0:
            j = tree.parents[j]
            ancestors[i, j] = True
    assert tree.mask.dtype == bool and (tree.mask == ancestors).all()

    leaves = sorted(set(range(n)) - set(tree.parents[1:].tolist()))
    assert tree.paths.shape == (len(leaves), tree.depths.max() + 1)
    for row, leaf in zip(tree.paths, leaves):
        path = row[row >= 0]
        assert (row[len(path) :] == -1).all()
        assert path[0] == 0 and path[-1] == leaf and len(path) == tree.depths[leaf] + 1
        assert (tree.parents[path[1:]] == path[:-1]).all()


def test_scores_rank_whole_paths_not_single_steps():
    """A likely grandchild of a likely node beats an unlikely child of the root."""
    config = TreeConfig(total_tokens=4, depth=1, top_k=2)
    table = {1: ([-0.1, -0.2], [5, 6]), 2: ([-3.0, -4.0], [7, 8])}

    def step(tokens, parent_rows, mask, level):
        logp, ids = zip(*(table[int(t)] for t in tokens))
        return np.array(logp, np.float32), np.array(ids)

    tree = build_draft_tree(0, np.array([-0.5, -1.0]), np.array([1, 2]), step, config)
    # scores: 1:-0.5 2:-1.0 | 5:-0.6 6:-0.7 7:-4.0 8:-5.0 -> best three: 1, 5, 6
    assert tree.tokens.tolist() == [0, 1, 5, 6]
    assert tree.parents.tolist() == [-1, 0, 1, 1]
    assert tree.paths.tolist() == [[0, 1, 2], [0, 1, 3]]


def test_positive_log_prob_noise_never_detaches_a_child():
    def step(tokens, parent_rows, mask, level):
        return np.array([[0.5]], np.float32), np.array([[2]])

    tree = build_draft_tree(0, np.array([-1.0]), np.array([1]), step, TreeConfig(2, 1, 1))
    assert tree.tokens.tolist() == [0, 1] and tree.parents.tolist() == [-1, 0]


@pytest.mark.parametrize(
    "total, depth, top_k",
    [(1, 1, 1), (2, 0, 1), (2, 1, 0), (1 + 2 + 1 * 4 + 1, 1, 2)],
)
def test_config_rejects_impossible_trees(total, depth, top_k):
    with pytest.raises(ValueError, match="TreeConfig"):
        TreeConfig(total, depth, top_k)


def test_step_output_shape_is_checked():
    def bad_step(tokens, parent_rows, mask, level):
        return np.zeros((2, 3), np.float32), np.zeros((2, 3), np.int64)

    with pytest.raises(ValueError, match=r"step log-probs \| shape \(2, 3\)"):
        build_draft_tree(0, np.zeros(2), np.arange(2), bad_step, TreeConfig(3, 1, 2))
