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

Short answers are planned to their end instead (``plan_to_end``): tokens drafted past an
answer's end are worthless and rounds come whole, so for a 9-token caption two rounds of 4
beat three of 3 that the rate prefers. Where the generations of a prompt kind (their lengths
recorded at each ``end``) or the budget say the end is within ``PLAN_LENGTHS`` tokens, each
round picks the action (a tree, or plain decoding to the end) with the least expected time
to the end, by dynamic programming over the tokens emitted, from the same acceptance model;
generations that run longer are valued at the best rate beyond that.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Protocol

import numpy as np

from .errors import VispecError
from .tree import StaticPolicy, TreeConfig, build_draft_tree, tree_name

if TYPE_CHECKING:
    from .speculative import Drafter
    from .target import TargetModel

# Trees the auto policy chooses from, smallest first (EAGLE-2 / ViSpec shapes and smaller
# ones for CPUs and edge GPUs, and a deep chain (8, 6, 1) for answers the drafter knows word
# for word: on the demo's detailed descriptions ~7 tokens a pass where the others stop at
# ~3.8, a round ~1.03x (8, 2, 3)'s on a CPU). Those wider than the drafter's top-k or longer
# than the cache allows are dropped.
CANDIDATES = (
    TreeConfig(total_tokens=3, depth=1, top_k=1),
    TreeConfig(total_tokens=4, depth=2, top_k=2),
    TreeConfig(total_tokens=8, depth=2, top_k=3),
    TreeConfig(total_tokens=8, depth=6, top_k=1),
    TreeConfig(total_tokens=16, depth=3, top_k=4),
    TreeConfig(total_tokens=30, depth=3, top_k=8),
    TreeConfig(total_tokens=60, depth=5, top_k=10),
)
# An ``exact`` target's candidates: chains (``check_chains``), and its default tree
CHAINS = tuple(TreeConfig(total_tokens=n + 1, depth=n - 1, top_k=1) for n in (2, 3, 4, 5))
EXACT_TREE = CHAINS[1]


class TreePolicy(Protocol):
    """What the speculative loop asks before and tells after every round (a ``TreeConfig``
    is the policy of that one tree)."""

    trees: tuple[TreeConfig, ...]  # every tree it may pick

    def start(self, images: bool = False, budget: int | None = None) -> None:
        """A generation begins (``images``: its prompt has images; ``budget``: it ends after
        this many tokens at most) with its first token (the prefill's) emitted."""

    def next_tree(self) -> TreeConfig | None:
        """The tree of the next round, or ``None``: decode plainly to the end."""

    def observe(self, tree: TreeConfig, accepted_levels: int) -> None:
        """A round with ``tree`` accepted ``accepted_levels`` drafted tokens (and emitted
        them and the target's bonus token)."""

    def end(self, tokens: int, eos: bool) -> None:
        """The generation ended after ``tokens`` tokens, at an EOS or (``eos`` False) cut
        short by its budget or a cancel."""


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
                 depth: int | None = None, top_k: int | None = None,
                 exact: bool = False) -> TreeConfig:
    """The default tree for drafter ``kind`` on ``backend`` (CPU-sized for CPU backends,
    the published one otherwise; a chain for ``exact`` targets), with any of its fields
    overridden."""
    base = EXACT_TREE if exact else CPU_TREE if backend in CPU_BACKENDS else DEFAULT_TREES[kind]
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
        policy = default_tree(drafter.kind, target.backend, *(setting or ()), exact=target.exact)
    else:
        policy = setting
    check_chains(policy.trees, target)
    return policy


def check_chains(trees, target: TargetModel) -> None:
    """Refuse branched trees on an ``exact`` target: a node's ancestors would sit at other
    key positions than in plain decoding, which the attention's sums see."""
    branched = [t for t in trees if t.top_k > 1]
    if target.exact and branched:
        raise VispecError(f"exact decoding verifies chains, not tree {tree_name(branched[0])} "
                          f"(top_k {branched[0].top_k}). Hint: --top-k 1, or the auto tree (no "
                          f"--total-tokens/--depth/--top-k), or drop --exact")


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
def tree_model(tree: TreeConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Over the (h, g) grid: log P(a round accepts exactly l drafted tokens) ``[grid, levels+1]``,
    E[tokens of a round] ``[grid]`` and P(exactly l) itself (computed once per tree and
    process)."""
    at_least = np.stack([reach(tree, rank_probs(h, g, tree.top_k))
                         for h, g in zip(GRID_H, GRID_G)])            # [grid, levels+1]
    exactly = np.maximum(at_least - np.pad(at_least[:, 1:], ((0, 0), (0, 1))), 1e-12)
    return np.log(exactly), at_least.sum(axis=1), exactly


PLAN_LENGTHS = 32  # generations ending within this many tokens are planned to their end
PLAN_SHARE = 0.75  # trees whose rate is within this share of the best are planned with


def plan_to_end(emitted: int, lengths: np.ndarray, longer: float, round_ms: np.ndarray,
                emits: np.ndarray, plain_ms: float) -> np.ndarray | None:
    """Expected milliseconds to a generation's end from ``emitted`` tokens on, of decoding
    plainly to the end and of a round of each tree (then the best action again), ``[1 + A]``;
    None where the end is not in reach (the history has no end after ``emitted`` within
    ``len(lengths) - 1`` tokens: the rate decides).

    ``lengths [N+1]``: weights of generations ending at L tokens, L = 0..N; ``longer``: of
    those running past N, valued at the best rate (ms a token) beyond N. ``round_ms [A]``:
    a round of each tree; ``emits [A, K]``: P(a round emits k tokens), k = 1..K."""
    n_max = len(lengths) - 1
    alive = np.append(np.cumsum(lengths[::-1])[::-1][1:], 0.0) + longer  # P(L > m), m <= N
    if emitted > n_max or lengths[emitted + 1:].sum() <= 0 or alive[emitted] <= 0:
        return None
    k = np.arange(1, emits.shape[1] + 1)
    best_ms = min(plain_ms, float(np.min(round_ms / (emits @ k))))  # a token, in the long run
    top = n_max + 1 if longer > 0 else int(np.flatnonzero(lengths)[-1])  # all ended by top
    alive = np.append(alive[:top], np.full(len(k) + 1, longer))  # [top + K + 1]
    # alive x expected ms to the end from m tokens, the generation alive at m
    worth = np.zeros(len(alive))
    worth[top:] = -best_ms * longer * np.arange(top, len(alive)) if longer > 0 else 0.0
    steps_left = np.cumsum(alive[top - 1::-1])[::-1]  # E[plain steps to the end] x alive
    # a dozen states and actions: Python lists beat numpy's per-call cost here
    emits_l, ms_l, alive_l, worth_l = emits.tolist(), round_ms.tolist(), alive.tolist(), \
        worth.tolist()
    for m in range(top - 1, emitted - 1, -1):
        after, per = worth_l[m + 1:m + 1 + len(k)], 1.0 / alive_l[m]
        actions = [ms + per * sum(p * w for p, w in zip(row, after))
                   for ms, row in zip(ms_l, emits_l)]
        plain = math.inf if longer > 0 else plain_ms * float(steps_left[m]) * per
        worth_l[m] = alive_l[m] * min(plain, *actions)
    return np.array([plain, *actions])


@functools.lru_cache(maxsize=None)
def token_table(trees: tuple[TreeConfig, ...]) -> tuple[np.ndarray, np.ndarray]:
    """E[tokens of a round] of each tree over the (h, g) grid, and its square. # [trees, grid]"""
    tokens = np.stack([tree_model(tree)[1] for tree in trees])
    return tokens, tokens**2


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
    # weights of the lengths (tokens) of past generations of each kind, ``lengths`` the
    # current kind's: [L] ended at L tokens (L <= PLAN_LENGTHS), [-1] longer or cut short
    length_kinds: dict[bool, np.ndarray] = field(default_factory=dict)
    lengths: np.ndarray = field(default_factory=lambda: np.zeros(PLAN_LENGTHS + 2))
    emitted: int = 1                # tokens this generation has emitted
    budget: int | None = None       # its most tokens

    def __post_init__(self) -> None:
        if not self.round_ms or self.plain_ms <= 0:
            raise ValueError("AutoTree needs measured round times and a plain step time")
        for tree in self.round_ms:  # the acceptance model's tables (under 0.1 s a tree),
            tree_model(tree)        # built before any round is timed

    @property
    def trees(self) -> tuple[TreeConfig, ...]:
        return tuple(self.round_ms)

    def start(self, images: bool = False, budget: int | None = None) -> None:
        """A new generation: try trees again, trusting past rounds and lengths of prompts of
        its kind (with or without images) ``memory`` as much (a drafter that never wins is
        tried about every other generation, not every one)."""
        self.fallen_back = self.explored = False
        self.seen = self.kinds.setdefault(images, self.seen if not self.kinds else {})
        for counts in self.seen.values():
            counts *= self.memory
        self.lengths = self.length_kinds.setdefault(
            images, self.lengths if not self.length_kinds else np.zeros(PLAN_LENGTHS + 2))
        self.lengths *= self.memory
        self.emitted, self.budget = 1, budget

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
        return float(self._expected((tree,), posterior)[0])

    def _expected(self, trees: tuple[TreeConfig, ...],
                  posterior: np.ndarray | None = None) -> np.ndarray:
        """``expected_tokens`` of each of ``trees``, at once. # [len(trees)]"""
        w = self.posterior() if posterior is None else posterior
        tokens, squares = token_table(trees)
        mean = tokens @ w
        var = np.maximum(squares @ w - mean**2, 0.0) + (self.misfit * mean) ** 2
        rounds, own_tokens = np.zeros(len(trees)), np.zeros(len(trees))
        for i, tree in enumerate(trees):
            own = self.seen.get(tree)
            if own is not None:
                rounds[i] = own.sum()
                own_tokens[i] = rounds[i] + own @ np.arange(len(own))  # tokens its rounds emitted
        weight = self.prior_rounds / (self.prior_rounds + rounds)
        mean = weight * mean + (1 - weight) * own_tokens / np.maximum(rounds, 1e-9)
        return mean + self.optimism * np.sqrt(var * weight)

    def rates(self, posterior: np.ndarray | None = None) -> dict[TreeConfig | None, float]:
        """Expected tokens per millisecond of every candidate (``None``: plain decoding)."""
        trees = self.trees
        rates = self._expected(trees, posterior) / np.array([self.round_ms[t] for t in trees])
        return {None: 1.0 / self.plain_ms, **dict(zip(trees, rates.tolist()))}

    def emits(self, tree: TreeConfig, posterior: np.ndarray, tokens: float) -> np.ndarray:
        """P(a round of ``tree`` emits k tokens), k = 1..levels + 1: the model's posterior
        mean weighed as ``prior_rounds`` rounds against the tree's own rounds, its mean
        raised to ``tokens`` (``expected_tokens``, optimistic) by moving mass to the most
        tokens (a tree the plan leaves for plain decoding is never tried again). # [levels+1]"""
        model = posterior @ tree_model(tree)[2]
        own = self.seen.get(tree, np.zeros(len(model)))
        weight = self.prior_rounds / (self.prior_rounds + float(own.sum()))
        p = weight * model / model.sum() + (1 - weight) * own / max(float(own.sum()), 1e-9)
        mean = float(p @ np.arange(1, len(p) + 1))
        lift = min(max((tokens - mean) / max(len(p) - mean, 1e-9), 0.0), 1.0)
        p *= 1 - lift
        p[-1] += lift
        return p

    def to_end(self, posterior: np.ndarray | None = None,
               rates: dict[TreeConfig | None, float] | None = None
               ) -> dict[TreeConfig | None, float] | None:
        """Expected milliseconds to this generation's end by each first action (``None``:
        plain decoding to the end; trees within ``PLAN_SHARE`` of the best rate), where the
        end is in planning reach (``plan_to_end``); None where it is not."""
        lengths = self.lengths.copy()
        if lengths.sum() <= 0:  # nothing seen yet: the generation may run to its budget
            lengths[-1] = 1.0
        if self.budget is not None and self.budget <= PLAN_LENGTHS:
            lengths[self.budget] += lengths[self.budget + 1:].sum()
            lengths[self.budget + 1:] = 0.0
        if lengths[self.emitted + 1:-1].sum() <= 0:  # no end in reach (cheap: most rounds)
            return None
        w = self.posterior() if posterior is None else posterior
        rates = self.rates(w) if rates is None else rates
        best = max(r for t, r in rates.items() if t is not None)
        trees = [t for t, r in rates.items() if t is not None and r >= PLAN_SHARE * best]
        emits = np.zeros((len(trees), max(levels(t) for t in trees) + 1))
        for i, tree in enumerate(trees):
            p = self.emits(tree, w, rates[tree] * self.round_ms[tree])
            emits[i, :len(p)] = p
        ms = plan_to_end(self.emitted, lengths[:-1], float(lengths[-1]),
                         np.array([self.round_ms[t] for t in trees]), emits, self.plain_ms)
        return None if ms is None else dict(zip((None, *trees), ms.tolist()))

    def next_tree(self) -> TreeConfig | None:
        if self.fallen_back:
            return None
        posterior = self.posterior()
        rates = self.rates(posterior)
        plain = rates.pop(None)
        best = max(rates.values())
        self.fallen_back = best < (1 + self.margin) * plain
        if self.fallen_back:
            return None
        to_end = self.to_end(posterior, {**rates, None: plain})
        if to_end is not None:  # the end is near: the soonest there
            choice = min(to_end, key=to_end.get)
            self.fallen_back = choice is None
            return choice
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
        self.emitted += min(accepted_levels, levels(tree)) + 1

    def end(self, tokens: int, eos: bool) -> None:
        self.lengths[min(tokens, PLAN_LENGTHS + 1) if eos else PLAN_LENGTHS + 1] += 1
