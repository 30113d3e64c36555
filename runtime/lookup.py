"""Lookup drafts: the tokens that followed the latest earlier occurrence of the context's
last n tokens (prompt lookup over the whole conversation, the answer so far included),
grafted onto the drafter's tree as one more branch.

Small targets repeat themselves (lists, refrains, restated questions); where the drafter's
one layer misses such a repeat, the lookup branch catches it. Verification is unchanged: a
branch is only a guess, and the target keeps its own argmax path (greedy decoding). The
grafted nodes cost verification time where they miss: on the demo's 48-token answers the
branch (8 tokens) changed text by -0.02..+0.02x and cost detailed descriptions 0.17-0.31x
(the drafters already copy those); on 128-token chat answers it gained +0.07-0.09x over a
fixed (4,2,2) tree (benchmarks/RESULTS.md). Hence off by default.
"""
from __future__ import annotations

import numpy as np

from .tree import DraftTree, ancestor_mask, leaf_paths

NGRAMS = (3, 2)  # suffix lengths tried, longest first
LOOKUP = 0  # off by default: it pays on long repetitive answers only (README, RESULTS.md)


def lookup_chain(context: np.ndarray, max_tokens: int, ngrams: tuple[int, ...] = NGRAMS) -> np.ndarray:
    """Up to ``max_tokens`` tokens that followed the latest earlier occurrence of the last
    n tokens of ``context [L]`` (the longest n of ``ngrams`` that occurs), else empty."""
    n_ctx = len(context)
    for n in ngrams:
        if n_ctx <= n:
            continue
        key = context[n_ctx - n:]
        # windows starting at 0..L-n-1 (the suffix itself excluded)
        hits = np.ones(n_ctx - n, bool)
        for i in range(n):
            hits &= context[i:n_ctx - n + i] == key[i]
        found = np.flatnonzero(hits)
        if len(found):
            start = int(found[-1]) + n
            return context[start:start + max_tokens].astype(np.int64)
    return np.zeros(0, np.int64)


def graft(tree: DraftTree, chain: np.ndarray) -> DraftTree:
    """``tree`` with ``chain`` as a path from the root: its tokens follow the existing nodes
    that already hold them, the rest become new nodes (appended, parents first)."""
    node, rest = 0, 0
    while rest < len(chain):
        children = np.flatnonzero((tree.parents == node) & (tree.tokens == chain[rest]))
        if not len(children):
            break
        node, rest = int(children[0]), rest + 1
    extra = chain[rest:]
    if not len(extra):
        return tree
    size = len(tree.tokens)
    new = np.arange(size, size + len(extra))
    parents = np.concatenate([tree.parents, [node], new[:-1]]).astype(np.int64)
    depths = np.concatenate([tree.depths, tree.depths[node] + 1 + np.arange(len(extra))])
    mask = ancestor_mask(parents, depths)
    return DraftTree(tokens=np.concatenate([tree.tokens, extra]).astype(np.int64),
                     parents=parents, depths=depths.astype(np.int64), mask=mask,
                     paths=leaf_paths(parents, depths, mask))
