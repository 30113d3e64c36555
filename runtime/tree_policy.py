"""Which draft tree to verify next, or none: fixed trees and the cost-aware ``auto`` policy.

``AutoTree`` picks, before every round, the tree with the most expected tokens per second

    rate(tree)  = E[tokens | tree] / round_ms(tree)        round_ms measured on this machine
    rate(plain) = 1 / step_ms(plain)
    E[tokens | tree] = 1 + a + a^2 + ... + a^L              L = levels the tree can accept

where ``a`` is the chance that the target accepts the next level of the path, estimated
online per tree from the rounds seen (shrunk towards the estimate pooled over all trees,
with an optimistic bonus while few rounds were seen: EAGLE's "measure, don't guess" and
SMART's "expand only when it pays"). When plain decoding has the best rate the generation
goes on plainly to its end; acceptance statistics carry over (weighted 0.8) to the next one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

from .tree import TreeConfig

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
    """What the speculative loop asks before and tells after every round."""

    trees: tuple[TreeConfig, ...]  # every tree it may choose

    def start(self) -> None:
        """A generation begins."""

    def choose(self) -> TreeConfig | None:
        """The tree of the next round, or ``None``: decode plainly to the end."""

    def observe(self, tree: TreeConfig, accepted_levels: int) -> None:
        """A round with ``tree`` accepted ``accepted_levels`` drafted tokens."""


@dataclass
class FixedTree:
    """The same tree every round (explicit ``--total-tokens/--depth/--top-k``)."""

    tree: TreeConfig

    @property
    def trees(self) -> tuple[TreeConfig, ...]:
        return (self.tree,)

    def start(self) -> None:
        pass

    def choose(self) -> TreeConfig:
        return self.tree

    def observe(self, tree: TreeConfig, accepted_levels: int) -> None:
        pass


def levels(tree: TreeConfig) -> int:
    """How many drafted tokens one round of ``tree`` can accept: its deepest node's depth."""
    return min(tree.depth + 1, tree.total_tokens - 1)


def expected_tokens(tree: TreeConfig, accept: float) -> float:
    """Tokens a round emits when each level is accepted with probability ``accept``."""
    return sum(accept ** i for i in range(levels(tree) + 1))


@dataclass
class _Counts:
    accepted: float = 0.0  # levels accepted
    tried: float = 0.0     # levels tried (accepted + the one that failed, if any)

    def add(self, accepted: int, possible: int) -> None:
        self.accepted += accepted
        self.tried += accepted + (accepted < possible)

    def scale(self, weight: float) -> None:
        self.accepted, self.tried = self.accepted * weight, self.tried * weight


@dataclass
class AutoTree:
    """Cost-aware tree choice from measured costs (``tree_calibration``) and online acceptance.

    ``round_ms`` maps each candidate tree to the measured milliseconds of one round,
    ``plain_ms`` is one plain decode step on the same machine.
    """

    round_ms: dict[TreeConfig, float]
    plain_ms: float
    prior_strength: float = 4.0   # pseudo-levels of the pooled estimate in each tree's
    optimism: float = 1.0         # standard deviations added to the acceptance estimate
    memory: float = 0.8           # weight of past generations' rounds at each new one
    counts: dict[TreeConfig, _Counts] = field(default_factory=dict)
    fallen_back: bool = False

    def __post_init__(self) -> None:
        if not self.round_ms or self.plain_ms <= 0:
            raise ValueError("AutoTree needs measured round times and a plain step time")

    @property
    def trees(self) -> tuple[TreeConfig, ...]:
        return tuple(self.round_ms)

    def start(self) -> None:
        """A new generation: try trees again, trusting past rounds ``memory`` as much (a
        drafter that never wins is tried about every third generation, not every one)."""
        self.fallen_back = False
        for c in self.counts.values():
            c.scale(self.memory)

    def acceptance(self, tree: TreeConfig) -> float:
        """Optimistic estimate of the per-level acceptance of ``tree``."""
        pooled = _Counts(sum(c.accepted for c in self.counts.values()),
                         sum(c.tried for c in self.counts.values()))
        prior = (pooled.accepted + 1) / (pooled.tried + 2)
        own = self.counts.get(tree, _Counts())
        a = own.accepted + self.prior_strength * prior
        b = own.tried - own.accepted + self.prior_strength * (1 - prior)
        mean, var = a / (a + b), a * b / ((a + b) ** 2 * (a + b + 1))
        return min(1.0, mean + self.optimism * math.sqrt(var))

    def rates(self) -> dict[TreeConfig | None, float]:
        """Expected tokens per millisecond of every candidate (``None``: plain decoding)."""
        out: dict[TreeConfig | None, float] = {None: 1.0 / self.plain_ms}
        for tree, ms in self.round_ms.items():
            out[tree] = expected_tokens(tree, self.acceptance(tree)) / ms
        return out

    def choose(self) -> TreeConfig | None:
        if self.fallen_back:
            return None
        rates = self.rates()
        best = max(rates, key=lambda t: rates[t])
        self.fallen_back = best is None
        return best

    def observe(self, tree: TreeConfig, accepted_levels: int) -> None:
        self.counts.setdefault(tree, _Counts()).add(accepted_levels, levels(tree))
