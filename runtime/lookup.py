"""Lookup drafts: the tokens that followed the latest earlier occurrence of the context's
last n tokens (prompt lookup over the whole conversation, the answer so far included),
grafted onto the drafter's tree as one more branch.

Small targets repeat themselves (lists, refrains, restated questions); where the drafter's
one layer misses such a repeat, the lookup branch catches it. Verification is unchanged: a
branch is only a guess, and the target keeps its own argmax path (greedy decoding). Its
nodes cost verification time where they miss (detailed descriptions, which the drafters
already copy), so ``LookupGate`` grafts only where they have been accepted. The demo's
drafters on its chat prompts (benchmarks/RESULTS.md): +0.04x over ``auto`` without it on
128-token answers, within the noise on 48-token answers and on image prompts.
"""
from __future__ import annotations

import numpy as np

from .tree import DraftTree, ancestor_mask, leaf_paths

NGRAMS = (3, 2)  # suffix lengths tried, longest first
FLOOR = 0.1  # grafted nodes accepted per grafted node below which a prompt kind stops grafting
PROBE = 8  # ... but for every PROBE-th round of that kind
FADE = 0.9  # weight of older grafts per grafted round
LOOKUP = 8  # the branch's default length (0: off)


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


class LookupGate:
    """Whether to graft this round: grafted nodes cost verification time whether or not the
    target accepts them, so a prompt kind (with or without images, kept apart as the trees'
    ``auto`` keeps them) stops grafting while fewer than ``FLOOR`` of its grafted nodes are
    accepted (faded over recent grafts; a prior of 1 in 2), and tries again every ``PROBE``
    rounds of that kind."""

    def __init__(self):
        self.seen = {kind: np.array([1.0, 2.0]) for kind in (False, True)}  # accepted, grafted
        self.rounds = {False: 0, True: 0}

    def wanted(self, images: bool) -> bool:
        self.rounds[images] += 1
        accepted, grafted = self.seen[images]
        return accepted >= FLOOR * grafted or self.rounds[images] % PROBE == 0

    def observe(self, images: bool, grafted: int, accepted: int) -> None:
        """A round verified ``grafted`` lookup nodes, of which the target accepted ``accepted``."""
        self.seen[images] = self.seen[images] * FADE + (accepted, grafted)
