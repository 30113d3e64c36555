"""The speculative loop: draft a tree, verify it in one target pass, keep the exact prefix.

    prefill target -> x_L ; drafter.prefill -> top-k of the next token
    repeat:
      tree   = build_draft_tree(root = last emitted token, drafter steps)    # [T] nodes
      out    = target.step(tree tokens, positions = next_pos + depth, tree mask)
      v      = verify(tree, out.argmax())          # accepted path (root first) + bonus
      cache.compact(accepted rows -> their final slots)   # in place, no reallocation
      drafter.advance(out.hidden_rows(accepted), accepted drafted tokens + bonus)

Greedy verification keeps exactly the target's own argmax chain; sampling verification
keeps the target's distribution (``acceptance.accept_sampling``). The loop is
``session.Session.generate_speculative`` (a conversation's state); its steps and the checks
of its trees are here. Each round's tree comes from a ``tree_policy.TreePolicy``.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np

from .acceptance import Verification
from .errors import VispecError
from .families import Prompt
from .generate import GenerationResult, OnTokens
from .kv_cache import KVCache
from .masks import tree_mask
from .sampling import Sampling, TokenChooser
from .target import StepOutput, TargetModel
from .tree import DraftTree, TreeConfig, build_draft_tree, tree_name
from .tree_policy import TreePolicy


class Drafter(Protocol):
    """What the loop needs of a drafter session (``vispec.runtime.drafters``)."""

    kind: str
    top_k: int
    prompt_end: int  # its prompt rows before this one are kept when a prefill continues
    prefills: int    # prefills so far (whose rows the cache holds: the latest's)

    def prefill(self, input_ids: np.ndarray, embeds: np.ndarray, features: np.ndarray,
                next_token: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]: ...

    def tree_step(self, tokens: np.ndarray, parent_rows: np.ndarray, mask: np.ndarray,
                  level: int) -> tuple[np.ndarray, np.ndarray]: ...

    def advance(self, features: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    def room(self) -> int: ...  # free rows of the drafter's cache after its committed rows


def draft(drafter: Drafter, root: int, topk: tuple[np.ndarray, np.ndarray],
          config: TreeConfig) -> DraftTree:
    """Expand an EAGLE-2 tree from ``root`` with the drafter's top-k (cut to the config's)."""
    k = config.top_k

    def step(tokens, parent_rows, mask, level):
        logp, ids = drafter.tree_step(tokens, parent_rows, mask, level)
        return logp[:, :k], ids[:, :k]

    return build_draft_tree(root, topk[0][:k], topk[1][:k], step, config)


def verify(target: TargetModel, cache: KVCache, tree: DraftTree, position: int,
           chooser: TokenChooser) -> tuple[Verification, StepOutput]:
    """One target pass over the whole tree; the accepted nodes' K/V are compacted in place
    to the cache's next slots and committed."""
    past = cache.length
    out = target.step_tokens(cache, tree.tokens,
                             target.glue.step_position_ids(position, tree.depths),
                             tree_mask(past, tree.mask), greedy=chooser.sampling.greedy)
    verification = chooser.verify(tree, out)
    cache.compact(past + verification.accepted, past)
    return verification, out


def generate_speculative(target: TargetModel, drafter: Drafter, prompt: Prompt,
                         max_new_tokens: int, *, tree: TreePolicy,
                         sampling: Sampling = Sampling(), cache: KVCache | None = None,
                         on_tokens: OnTokens | None = None) -> GenerationResult:
    """Speculative decoding; the output equals ``generate_plain``'s under greedy sampling.
    A one-generation ``session.Session`` (``Session.generate_speculative``); ``tree``: a
    ``TreeConfig`` or another policy."""
    from .session import Session

    return Session(target, drafter, cache).generate_speculative(
        prompt, max_new_tokens, tree=tree, sampling=sampling, on_tokens=on_tokens)


def fitting(tree: TreeConfig, cache: KVCache, drafter: Drafter) -> TreeConfig | None:
    """``tree`` when one round of it fits both caches (its nodes after the target's valid
    rows, its rows after the drafter's committed ones, once the drafter has taken the last
    round's rows), else None: the generation ends plainly, which needs one row per token,
    as the budget check guaranteed."""
    return tree if fits_caches(cache, drafter, tree.total_tokens, tree.drafter_rows) else None


def fits_caches(cache: KVCache, drafter: Drafter, nodes: int, drafter_rows: int) -> bool:
    """Whether a round verifying ``nodes`` tree nodes and then needing ``drafter_rows`` rows
    after the drafter's committed ones fits both caches."""
    return cache.length + nodes <= cache.max_len and drafter_rows <= drafter.room()


def check_tree_size(trees, max_len: int) -> None:
    """Refuse a tree that no cache of ``max_len`` rows can ever verify."""
    for tree in trees:
        if max(tree.total_tokens, tree.drafter_rows) >= max_len:
            raise VispecError(f"draft tree {tree_name(tree)} needs {tree.total_tokens} target "
                              f"and {tree.drafter_rows} drafter cache rows per round, but "
                              f"max_len is {max_len}. Hint: lower --total-tokens, --depth or "
                              f"--top-k")


def check_tree_width(trees, drafter: Drafter) -> None:
    """Refuse trees wider than the drafter graph's top-k output."""
    widest = max((t.top_k for t in trees), default=0)
    if widest > drafter.top_k:
        raise VispecError(f"tree top_k {widest} > the drafter graph's top-k {drafter.top_k}. "
                          f"Hint: lower --top-k or re-export the drafter with a larger --top-k")
