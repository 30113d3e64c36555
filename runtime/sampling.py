"""Token choice: greedy, or temperature/top-p sampling with a seeded generator."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .acceptance import Verification, accept_greedy_choices, accept_sampling, target_probs
from .tree import DraftTree

if TYPE_CHECKING:
    from .target import StepOutput


@dataclass(frozen=True)
class Sampling:
    """``temperature == 0`` is greedy; otherwise softmax(logits / T) within top-p."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature | {self.temperature}. Expected: a finite number >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p | {self.top_p}. Expected: 0 < top_p <= 1")
        if self.seed is not None and self.seed < 0:
            raise ValueError(f"seed | {self.seed}. Expected: an integer >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class TokenChooser:
    """Chooses tokens from target logits, and verifies draft trees, under one ``Sampling``."""

    def __init__(self, sampling: Sampling):
        self.sampling = sampling
        self.rng = np.random.default_rng(sampling.seed)

    def choose(self, logits: np.ndarray) -> int:
        """The next token from logits ``[V]``."""
        s = self.sampling
        if s.greedy:
            return int(np.argmax(logits))
        p = target_probs(logits, s.temperature, s.top_p)
        return int(self.rng.choice(p.size, p=p))

    def choose_next(self, out: StepOutput) -> int:
        """The next token from a step's last row (greedy: reduced where the logits are)."""
        if self.sampling.greedy:
            return int(out.argmax()[-1])
        return self.choose(out.logits_row(-1))

    def verify(self, tree: DraftTree, out: StepOutput) -> Verification:
        """Accepted path of ``tree`` given the target's step over every tree node (greedy:
        only the argmax of each node reaches the host)."""
        s = self.sampling
        if s.greedy:
            return accept_greedy_choices(tree, out.argmax())
        return accept_sampling(tree, out.logits, s.temperature, self.rng, s.top_p)
