"""Which draft tree to verify next, or none: fixed trees and the cost-aware ``auto`` policy.

A tree setting, in whichever form a user gives it (``TreeSetting``), becomes one
``TreePolicy`` in ``resolve_tree``; the loop asks that policy for each round's tree
(``TreePolicy.next_tree``). A ``TreeConfig`` is itself the policy of one fixed tree.

``AutoTree`` picks, before every round, the tree with the most expected tokens per second

    rate(tree)  = E[tokens | tree] / round_ms(tree)        round_ms measured on this machine
    rate(plain) = 1 / step_ms(plain)

E[tokens | tree] comes from one model of the drafter shared by all trees: at every node the
target's next token is the drafter's r-th choice with probability p_r (p_1 = h, and
p_r = (1 - h) g (1 - g)^(r - 2) below it). The tree a round would draft is grown from those
log-probabilities exactly as the loop grows it (EAGLE-2: the best cumulative scores), and a
node is accepted with the product of its path's p_r, so

    P(accepted >= l | tree) = sum over the tree's depth-l nodes of prod p_r
    E[tokens | tree]        = 1 + sum_l P(accepted >= l | tree)

A chain (top_k 1) gains from h only, a wide tree also from the lower ranks, yet every round,
whatever its tree, informs the one (h, g): a grid posterior from the accepted lengths seen.
Each tree's estimate weighs the model against the tree's own rounds and is scored
optimistically (+ ``optimism`` standard deviations: EAGLE's "measure, don't guess" and
SMART's "expand only when it pays"); of trees within ``tie`` of the best the cheapest is
verified, and once per generation a tree hardly tried within ``explore`` of the best. When no
tree beats plain decoding by ``margin`` the generation goes on plainly to its end. Older
rounds weigh less: ``forget`` per round, ``memory`` per generation (so that a drafter that
lost is tried again now and then).
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Protocol

import numpy as np

from .errors import VispecError
from .tree import StaticPolicy, TreeConfig, build_draft_tree

if TYPE_CHECKING:
    from .speculative import Drafter
    from .target import TargetModel

# Trees the auto policy chooses from, smallest first (EAGLE-2 / ViSpec shapes and smaller
# ones for CPUs and edge GPUs). Those wider than the drafter's top-k or longer than the
# cache allows are dropped.
CANDIDATES = (
    TreeConfig(total_tokens=3, depth=1, top_k=1),
    TreeConfig(total_tokens=4, depth=2, top_k=2),
    TreeConfig(total_tokens=8, depth=2, top_k=3),
    TreeConfig(total_tokens=16, depth=3, top_k=4),
    TreeConfig(total_tokens=30, depth=3, top_k=8),
    TreeConfig(total_tokens=60, depth=5, top_k=10),
)


class TreePolicy(Protocol):
    """What the speculative loop asks before and tells after every round (a ``TreeConfig``
    is the policy of that one tree)."""

    trees: tuple[TreeConfig, ...]  # every tree it may pick

    def start(self, images: bool = False) -> None:
        """A generation begins (``images``: its prompt has images)."""

    def next_tree(self) -> TreeConfig | None:
        """The tree of the next round, or ``None``: decode plainly to the end."""

    def observe(self, tree: TreeConfig, accepted_levels: int) -> None:
        """A round with ``tree`` accepted ``accepted_levels`` drafted tokens."""


class PlainDecoding(StaticPolicy):
    """No tree at all (no drafter, or ``auto`` where the cache has room for none of the
    candidates)."""

    trees: tuple[TreeConfig, ...] = ()

    def next_tree(self) -> None:
        return None


AUTO = "auto"  # the setting fitted to this machine's measured costs (``AutoTree``)
# Published defaults per drafter type (ViSpec paper; EAGLE-2 / HiViS): for GPU backends.
DEFAULT_TREES = {
    "vispec": TreeConfig(total_tokens=30, depth=3, top_k=8),
    "eagle": TreeConfig(total_tokens=60, depth=5, top_k=10),
    "hivis": TreeConfig(total_tokens=60, depth=5, top_k=10),
}
# On a CPU verifying T tokens costs ~1.6x one token at T=16 but ~3x at 60
# (benchmarks/RESULTS.md): large trees cannot pay off there.
CPU_TREE = TreeConfig(total_tokens=16, depth=3, top_k=4)
CPU_BACKENDS = ("ort",)
TreeFields = tuple[int | None, int | None, int | None]  # total_tokens, depth, top_k
TreeSetting = str | TreeConfig | TreeFields | TreePolicy | None  # what a user passes


def default_tree(kind: str, backend: str = "ort", total_tokens: int | None = None,
                 depth: int | None = None, top_k: int | None = None) -> TreeConfig:
    """The default tree for drafter ``kind`` on ``backend`` (CPU-sized for CPU backends,
    the published one otherwise), with any of its fields overridden."""
    base = CPU_TREE if backend in CPU_BACKENDS else DEFAULT_TREES[kind]
    try:
        return TreeConfig(total_tokens=base.total_tokens if total_tokens is None else total_tokens,
                          depth=base.depth if depth is None else depth,
                          top_k=base.top_k if top_k is None else top_k)
    except ValueError as e:
        raise VispecError(f"{e} Hint: adjust --total-tokens, --depth or --top-k") from None


def resolve_tree(setting: TreeSetting, target: TargetModel, drafter: Drafter | None,
                 drafter_dir: str | os.PathLike | None,
                 progress: Callable[[str], None] | None = None) -> TreePolicy:
    """The one policy a tree setting stands for, whichever form it takes:

        "auto"                          ``AutoTree`` on this machine's costs for these
                                        artifacts (``tree_calibration.auto_tree``: read
                                        from its cache, or measured now)
        None                            the backend's default tree for the drafter kind
        (total_tokens, depth, top_k)    that default with the fields given (None: kept)
        a TreeConfig or a policy        itself

    Without a drafter every generation is plain (``PlainDecoding``)."""
    if isinstance(setting, str) and setting != AUTO:
        raise VispecError(f"tree={setting!r}. Expected: 'auto', a TreeConfig or None. Hint: "
                          f"use 'auto' to fit the tree to this machine")
    if drafter is None:
        return PlainDecoding()
    if setting == AUTO:
        from .tree_calibration import auto_tree  # it runs the loop, which imports this module
        return auto_tree(target, drafter, drafter_dir, progress)
    if setting is None or isinstance(setting, tuple):
        return default_tree(drafter.kind, target.backend, *(setting or ()))
    return setting


def levels(tree: TreeConfig) -> int:
    """How many drafted tokens one round of ``tree`` can accept: its deepest node's depth."""
    return min(tree.depth + 1, tree.total_tokens - 1)


# The (h, g) grid of the acceptance model, flat prior: the drafter's top-1 hit rate h in
# (0, 1) and the hit rate g of each lower rank once the ranks above it missed, in (0, 0.5)
# (drafters' top-4 catch 0.2-0.6 of the tokens their top-1 misses: g ~ 0.07-0.27).
_H, _G = np.meshgrid((np.arange(24) + 0.5) / 24, (np.arange(10) + 0.5) / 20, indexing="ij")
GRID_H, GRID_G = _H.ravel(), _G.ravel()  # [grid]


def rank_probs(h: float, g: float, k: int) -> np.ndarray:
    """P(the target's next token is the drafter's r-th choice), r = 1..k. # [k]"""
    return np.concatenate([[h], (1 - h) * g * (1 - g) ** np.arange(k - 1)])


def reach(tree: TreeConfig, probs: np.ndarray) -> np.ndarray:
    """P(a round of ``tree`` accepts >= l drafted tokens), l = 0..levels(tree), when the
    target's token is the drafter's r-th choice with probability ``probs[r-1]`` at every node:
    the tree is grown from those log-probabilities by the loop's own ``build_draft_tree``
    (token ids = ranks). # [levels + 1]"""
    k = tree.top_k
    ranks = np.arange(k)
    logp = np.log(np.maximum(probs[:k], 1e-30)).astype(np.float32)

    def step(tokens, parent_rows, mask, level):
        return np.tile(logp, (len(tokens), 1)), np.tile(ranks, (len(tokens), 1))

    drafted = build_draft_tree(0, logp, ranks, step, tree)
    path = np.ones(len(drafted.tokens))  # [T] P(the node is accepted)
    for i in range(1, len(path)):        # parents come first
        path[i] = path[drafted.parents[i]] * probs[drafted.tokens[i]]
    return np.bincount(drafted.depths, weights=path, minlength=levels(tree) + 1)


@functools.lru_cache(maxsize=None)
def tree_model(tree: TreeConfig) -> tuple[np.ndarray, np.ndarray]:
    """Over the (h, g) grid: log P(a round accepts exactly l drafted tokens) ``[grid, levels+1]``
    and E[tokens of a round] ``[grid]`` (computed once per tree and process)."""
    at_least = np.stack([reach(tree, rank_probs(h, g, tree.top_k))
                         for h, g in zip(GRID_H, GRID_G)])            # [grid, levels+1]
    exactly = at_least - np.pad(at_least[:, 1:], ((0, 0), (0, 1)))
    return np.log(np.maximum(exactly, 1e-12)), at_least.sum(axis=1)


@dataclass
class AutoTree:
    """Cost-aware tree choice from measured costs (``tree_calibration``) and online acceptance.

    ``round_ms`` maps each candidate tree to the measured milliseconds of one round,
    ``plain_ms`` is one plain decode step on the same machine.
    """

    round_ms: dict[TreeConfig, float]
    plain_ms: float
    optimism: float = 0.5   # standard deviations of E[tokens] added to its posterior mean
    memory: float = 0.9     # weight of past generations' rounds at each new generation
    forget: float = 0.95    # weight of the rounds seen at each new round
    margin: float = 0.05    # share by which a tree must beat plain decoding
    prior_rounds: float = 8.0  # weight, in rounds, of the model's prediction for one tree
    # (a tree's own mean of 1-2 rounds is noise: one unlucky round kept (4,2,2) off int4 images)
    misfit: float = 0.1     # the model's relative error for one tree
    tie: float = 0.02       # trees within this share of the best rate: the cheapest is verified
    explore: float = 0.9    # a hardly tried tree within this share of the best gets one round
                            # per generation, once the tree in use has a round of its own
    seen: dict[TreeConfig, np.ndarray] = field(default_factory=dict)  # rounds per accepted
    fallen_back: bool = False                                          # length [levels+1]
    explored: bool = False  # this generation's exploring round is spent
    # ``seen`` of prompts with and without images, kept apart: a drafter may accept several
    # tokens a round on image answers and none on chat, and one must not silence the other
    kinds: dict[bool, dict[TreeConfig, np.ndarray]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.round_ms or self.plain_ms <= 0:
            raise ValueError("AutoTree needs measured round times and a plain step time")
        for tree in self.round_ms:  # the acceptance model's tables (under 0.1 s a tree),
            tree_model(tree)        # built before any round is timed

    @property
    def trees(self) -> tuple[TreeConfig, ...]:
        return tuple(self.round_ms)

    def start(self, images: bool = False) -> None:
        """A new generation: try trees again, trusting past rounds of prompts of its kind
        (with or without images) ``memory`` as much (a drafter that never wins is tried about
        every other generation, not every one)."""
        self.fallen_back = self.explored = False
        self.seen = self.kinds.setdefault(images, self.seen if not self.kinds else {})
        for counts in self.seen.values():
            counts *= self.memory

    def posterior(self) -> np.ndarray:
        """Weights of the (h, g) grid given every round seen. # [grid]"""
        log_post = np.zeros(len(GRID_H))
        for tree, counts in self.seen.items():
            log_post += tree_model(tree)[0] @ counts
        weights = np.exp(log_post - log_post.max())
        return weights / weights.sum()

    def expected_tokens(self, tree: TreeConfig, posterior: np.ndarray | None = None) -> float:
        """Optimistic tokens of a round of ``tree``: the model's posterior mean, weighed as
        ``prior_rounds`` rounds against the tree's own rounds, + ``optimism`` sd (the model's
        spread and its ``misfit``, shrinking with the tree's own rounds)."""
        w = self.posterior() if posterior is None else posterior
        tokens = tree_model(tree)[1]
        mean = float(w @ tokens)
        var = float(w @ (tokens - mean) ** 2) + (self.misfit * mean) ** 2
        own = self.seen.get(tree, np.zeros(1))
        rounds = float(own.sum())
        own_tokens = rounds + float(own @ np.arange(len(own)))  # tokens its rounds emitted
        weight = self.prior_rounds / (self.prior_rounds + rounds)
        mean = weight * mean + (1 - weight) * own_tokens / max(rounds, 1e-9)
        return mean + self.optimism * math.sqrt(max(var, 0.0) * weight)

    def rates(self) -> dict[TreeConfig | None, float]:
        """Expected tokens per millisecond of every candidate (``None``: plain decoding)."""
        posterior = self.posterior()
        out: dict[TreeConfig | None, float] = {None: 1.0 / self.plain_ms}
        for tree, ms in self.round_ms.items():
            out[tree] = self.expected_tokens(tree, posterior) / ms
        return out

    def next_tree(self) -> TreeConfig | None:
        if self.fallen_back:
            return None
        rates = self.rates()
        plain = rates.pop(None)
        best = max(rates.values())
        self.fallen_back = best < (1 + self.margin) * plain
        if self.fallen_back:
            return None
        chosen = min((t for t, r in rates.items() if r >= (1 - self.tie) * best),
                     key=lambda t: self.round_ms[t])
        rounds = {t: self.seen[t].sum() if t in self.seen else 0.0 for t in rates}
        untried = [t for t, r in rates.items() if rounds[t] < 1 and r >= self.explore * best]
        if untried and rounds[chosen] >= 1 and not self.explored:
            self.explored = True
            return max(untried, key=lambda t: rates[t])
        return chosen

    def observe(self, tree: TreeConfig, accepted_levels: int) -> None:
        for counts in self.seen.values():
            counts *= self.forget
        counts = self.seen.setdefault(tree, np.zeros(levels(tree) + 1))
        counts[min(accepted_levels, levels(tree))] += 1
