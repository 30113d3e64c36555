"""EAGLE-2 dynamic draft tree, in numpy.

The drafter is called level by level (``DraftStep``); every drafted token becomes a
*candidate* scored by its cumulative log-probability, and the best candidates form the
tree verified by the target. Candidate order is EAGLE's: the ``top_k`` level-1
candidates, then ``top_k**2`` per level (``parent_slot * top_k + child``), so a parent
always has a smaller candidate index than its children.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


class StaticPolicy:
    """A ``tree_policy.TreePolicy`` that learns nothing from its rounds (a fixed tree, or
    plain decoding): nothing to reset or observe."""

    def start(self, images: bool = False, budget: int | None = None) -> None:
        pass

    def observe(self, tree: TreeConfig, accepted_levels: int) -> None:
        pass

    def end(self, tokens: int, eos: bool) -> None:
        pass


@dataclass(frozen=True)
class TreeConfig(StaticPolicy):
    """Shape of the draft tree: ``total_tokens`` nodes including the root."""

    total_tokens: int
    depth: int  # drafter calls per round; the deepest node is at depth + 1
    top_k: int

    def __post_init__(self) -> None:
        if self.depth < 1 or self.top_k < 1 or self.total_tokens < 2:
            raise ValueError(
                f"TreeConfig | total_tokens={self.total_tokens}, depth={self.depth}, "
                f"top_k={self.top_k}. Expected: total_tokens >= 2, depth >= 1, top_k >= 1."
            )
        if self.total_tokens - 1 > self.n_candidates:
            raise ValueError(
                f"TreeConfig | total_tokens={self.total_tokens} needs more drafted tokens "
                f"than the {self.n_candidates} candidates of depth={self.depth}, "
                f"top_k={self.top_k}. Expected: total_tokens - 1 <= top_k + depth * top_k**2."
            )

    @property
    def n_candidates(self) -> int:
        return self.top_k + self.depth * self.top_k**2

    @property
    def drafter_rows(self) -> int:
        """Rows one round needs after the drafter's committed cache: ``depth`` levels of
        ``top_k`` tree rows, then (those dropped) the accepted path and the bonus token."""
        return max(self.depth * self.top_k, self.depth + 2)

    # A fixed tree is its own ``tree_policy.TreePolicy``: the same tree every round.
    @property
    def trees(self) -> tuple[TreeConfig, ...]:
        return (self,)

    def next_tree(self) -> TreeConfig:
        return self


PLAIN = "plain"  # the name of a plain decoding step where a tree is named


def tree_name(tree: TreeConfig | None) -> str:
    """``"total,depth,top_k"``, or ``"plain"`` for a plain step (``tree`` None)."""
    return PLAIN if tree is None else f"{tree.total_tokens},{tree.depth},{tree.top_k}"


@dataclass(frozen=True, eq=False)
class DraftTree:
    """A draft tree; node 0 is the root (the target's token), nodes sorted parents first."""

    tokens: np.ndarray  # [T] int64
    parents: np.ndarray  # [T] int64, parents[0] = -1, parents[i] < i
    depths: np.ndarray  # [T] int64, root depth 0
    mask: np.ndarray  # [T, T] bool, mask[i, j] iff j is i or an ancestor of i
    paths: np.ndarray  # [n_leaves, max_depth + 1] int64, root..leaf node indices, -1 padded


class DraftStep(Protocol):
    """One drafter call on the ``K = top_k`` current tree nodes of depth ``level``.

    ``parent_rows[j]``: the tree row (0..R-1, fed in earlier calls of this round) whose
    drafter output feature node j uses, or -1 for the last prefix row.
    ``mask``: [K, R + K] rows each node attends to among the R earlier tree rows and the
    K current ones (its ancestors and itself); the drafter prepends its prefix KV itself.
    Returns the top_k children of every node: log-probs [K, top_k] and ids [K, top_k].
    """

    def __call__(
        self, tokens: np.ndarray, parent_rows: np.ndarray, mask: np.ndarray, level: int
    ) -> tuple[np.ndarray, np.ndarray]: ...


def build_draft_tree(
    root_token: int,
    first_logp: np.ndarray,
    first_ids: np.ndarray,
    step: DraftStep,
    config: TreeConfig,
) -> DraftTree:
    """Grow the EAGLE-2 tree from the drafter's top-k at the last prefix row."""
    k = config.top_k
    scores = np.asarray(first_logp, np.float32)  # [K] cumulative log-probs of the current nodes
    tokens = np.asarray(first_ids, np.int64)  # [K]
    _check_shape("first_logp", scores, (k,))
    _check_shape("first_ids", tokens, (k,))
    cand_scores, cand_tokens, cand_parents = [scores], [tokens], [np.full(k, -1, np.int64)]
    nodes = np.arange(k)  # [K] candidate index of the current nodes
    parent_rows = np.full(k, -1, np.int64)  # [K]
    ancestors = np.zeros((k, 0), bool)  # [K, R] earlier tree rows each node attends to
    for level in range(1, config.depth + 1):
        step_mask = np.concatenate([ancestors, np.eye(k, dtype=bool)], axis=1)  # [K, R+K]
        logp, child_ids = step(tokens, parent_rows, step_mask, level)
        logp = np.asarray(logp, np.float32)
        child_ids = np.asarray(child_ids, np.int64)
        _check_shape("step log-probs", logp, (k, k))
        _check_shape("step ids", child_ids, (k, k))
        child_ids = child_ids.ravel()  # [K*K]
        # A child never outranks its parent (log-probs <= 0): the tree stays ancestor-closed.
        cumulative = (scores[:, None] + np.minimum(logp, 0)).ravel()  # [K*K]
        cand_scores.append(cumulative)
        cand_tokens.append(child_ids)
        cand_parents.append(np.repeat(nodes, k))
        survivors = _top(cumulative, k)  # [K] in 0..K*K-1
        slot = survivors // k  # [K] which current node is the parent
        nodes = k + (level - 1) * k * k + survivors
        scores, tokens = cumulative[survivors], child_ids[survivors]
        parent_rows = ancestors.shape[1] + slot
        ancestors = step_mask[slot]
    return _assemble(
        root_token,
        np.concatenate(cand_scores),
        np.concatenate(cand_tokens),
        np.concatenate(cand_parents),
        config,
    )


def _top(scores: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n best scores, ties going to the smaller index (so parents first)."""
    return np.argsort(-scores, kind="stable")[:n]


def _assemble(
    root_token: int,
    scores: np.ndarray,  # [C] cumulative log-probs of every candidate
    tokens: np.ndarray,  # [C]
    cand_parents: np.ndarray,  # [C] parent candidate index, -1 for the root
    config: TreeConfig,
) -> DraftTree:
    chosen = np.sort(_top(scores, config.total_tokens - 1))  # [T-1] candidate indices
    parent_cand = cand_parents[chosen]
    parents = np.where(parent_cand < 0, -1, np.searchsorted(chosen, parent_cand)) + 1
    parents = np.concatenate([[-1], parents]).astype(np.int64)  # [T]
    depths = _candidate_depths(chosen, config)
    mask = ancestor_mask(parents, depths)
    return DraftTree(
        tokens=np.concatenate([[root_token], tokens[chosen]]).astype(np.int64),
        parents=parents,
        depths=depths,
        mask=mask,
        paths=leaf_paths(parents, depths, mask),
    )


def _candidate_depths(chosen: np.ndarray, config: TreeConfig) -> np.ndarray:
    """Depth of each chosen candidate, root (depth 0) prepended. # [T]"""
    k = config.top_k
    depths = np.where(chosen < k, 1, (chosen - k) // k**2 + 2)  # K*K per level >= 2
    return np.concatenate([[0], depths]).astype(np.int64)


def ancestor_mask(parents: np.ndarray, depths: np.ndarray) -> np.ndarray:
    """[T, T] bool: each row is its parent's row plus itself, filled level by level."""
    mask = np.eye(len(parents), dtype=bool)
    for depth in range(1, int(depths.max()) + 1):
        level = np.flatnonzero(depths == depth)
        mask[level] |= mask[parents[level]]
    return mask


def leaf_paths(parents: np.ndarray, depths: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """[n_leaves, max_depth + 1]: column d holds the leaf's ancestor at depth d, else -1."""
    is_leaf = np.ones(len(parents), bool)
    is_leaf[parents[1:]] = False
    leaves = np.flatnonzero(is_leaf)  # [L]
    at_depth = depths[:, None] == np.arange(depths.max() + 1)  # [T, D+1]
    hits = mask[leaves][:, :, None] & at_depth[None]  # [L, T, D+1]
    return np.where(hits.any(axis=1), hits.argmax(axis=1), -1).astype(np.int64)


def _check_shape(name: str, array: np.ndarray, expected: tuple[int, ...]) -> None:
    if array.shape != expected:
        raise ValueError(f"{name} | shape {array.shape}. Expected: {expected}.")
