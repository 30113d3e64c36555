"""Verification of a draft tree against the target's logits at every tree node."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .tree import DraftTree


@dataclass(frozen=True, eq=False)
class Verification:
    """The accepted root-to-node path and the target's own token after it."""

    accepted: np.ndarray  # [n] int64 node indices, accepted[0] = 0 (the root), n >= 1
    next_token: int  # bonus token: the target's choice after the last accepted node


def accepted_tokens(tree: DraftTree, verification: Verification) -> np.ndarray:
    """Tokens this round emits: the accepted drafted tokens (root excluded), then the bonus."""
    drafted = tree.tokens[verification.accepted[1:]]
    return np.append(drafted, verification.next_token).astype(np.int64)  # [n]


def accept_greedy(tree: DraftTree, target_logits: np.ndarray) -> Verification:
    """Longest path whose drafted tokens are all the target's argmax; first such path on ties."""
    _check_logits(tree, target_logits)
    return accept_greedy_choices(tree, np.argmax(target_logits, axis=-1))


def accept_greedy_choices(tree: DraftTree, choice: np.ndarray) -> Verification:
    """``accept_greedy`` from the target's argmax at every tree node ``choice [T]`` (which a
    device-resident step computes on the device)."""
    if choice.shape != tree.tokens.shape:
        raise ValueError(f"target choices | shape {choice.shape}. Expected: "
                         f"{tree.tokens.shape} (one per tree node, root first)")
    correct = tree.tokens == choice[tree.parents]  # [T], row 0 is meaningless
    correct[0] = True
    paths = tree.paths  # [L, D+1]
    ok = np.where(paths >= 0, correct[paths], False)  # [L, D+1]
    lengths = np.cumprod(ok, axis=1).sum(axis=1)  # [L] accepted nodes, root included
    best = int(np.argmax(lengths))
    accepted = paths[best, : lengths[best]]
    return Verification(accepted=accepted, next_token=int(choice[accepted[-1]]))


def accept_sampling(
    tree: DraftTree,
    target_logits: np.ndarray,
    temperature: float,
    rng: np.random.Generator,
    top_p: float = 1.0,
) -> Verification:
    """Lossless tree speculative sampling (SpecInfer / EAGLE), drafts deterministic (q = 1).

    From the root, each node's children are tried in order: child token x is accepted
    with probability p(x); on rejection p(x) is set to 0 and p renormalised. When no
    child is accepted the bonus token is sampled from what is left of p.
    """
    _check_logits(tree, target_logits)
    if temperature <= 0:
        raise ValueError(f"temperature | {temperature}. Expected: > 0 (use accept_greedy).")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p | {top_p}. Expected: 0 < top_p <= 1.")
    accepted = [0]
    while True:
        p = target_probs(target_logits[accepted[-1]], temperature, top_p)  # [V]
        child = _accept_child(tree, accepted[-1], p, rng)  # p: residual on rejection
        if child < 0:
            bonus = rng.choice(p.size, p=p / p.sum())
            return Verification(np.array(accepted, np.int64), int(bonus))
        accepted.append(child)


def target_probs(logits: np.ndarray, temperature: float, top_p: float = 1.0) -> np.ndarray:
    """softmax(logits / temperature), restricted to the top-p nucleus. # [V] float64"""
    z = np.asarray(logits, np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1:
        order = np.argsort(-p, kind="stable")
        mass_before = np.cumsum(p[order]) - p[order]
        p[order[mass_before >= top_p]] = 0.0  # keeps the token crossing top_p
        p /= p.sum()
    return p


def _accept_child(tree: DraftTree, node: int, p: np.ndarray, rng: np.random.Generator) -> int:
    """The accepted child of ``node``, or -1; rejected tokens are zeroed in ``p`` in place."""
    for child in np.flatnonzero(tree.parents == node):
        token = tree.tokens[child]
        if rng.random() < p[token] / p.sum():
            return int(child)
        p[token] = 0.0
    return -1


def _check_logits(tree: DraftTree, target_logits: np.ndarray) -> None:
    n = len(tree.tokens)
    if target_logits.ndim != 2 or target_logits.shape[0] != n:
        raise ValueError(
            f"target_logits | shape {target_logits.shape}. Expected: [{n}, vocab] "
            "(the target's logits at every tree node, root first)."
        )
