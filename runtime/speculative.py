"""The speculative loop: draft a tree, verify it in one target pass, keep the exact prefix.

    prefill target -> x_L ; drafter.prefill -> top-k of the next token
    repeat:
      tree   = build_draft_tree(root = last emitted token, drafter steps)    # [T] nodes
      out    = target.step(tree tokens, positions = next_pos + depth, tree mask)
      v      = verify(tree, out.logits)            # accepted path (root first) + bonus
      cache.compact(accepted rows -> their final slots)   # in place, no reallocation
      drafter.advance(out.hidden[accepted], accepted drafted tokens + bonus)

Greedy verification keeps exactly the target's own argmax chain; sampling verification
keeps the target's distribution (``acceptance.accept_sampling``).
"""
from __future__ import annotations

import time
from typing import Protocol

import numpy as np

from .acceptance import Verification, accepted_tokens
from .errors import VispecError
from .families import Prompt
from .generate import GenerationResult, emit, finish, start
from .kv_cache import KVCache
from .masks import tree_mask
from .sampling import Sampling, TokenChooser
from .target import StepOutput, TargetModel
from .tree import DraftTree, TreeConfig, build_draft_tree

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


def tree_config(kind: str, backend: str = "ort", total_tokens: int | None = None,
                depth: int | None = None, top_k: int | None = None) -> TreeConfig:
    """The default tree for drafter ``kind`` on ``backend`` (CPU-sized for CPU backends,
    the published one otherwise), with any of its fields overridden."""
    base = CPU_TREE if backend in CPU_BACKENDS else DEFAULT_TREES[kind]
    try:
        return TreeConfig(total_tokens=total_tokens or base.total_tokens,
                          depth=depth or base.depth, top_k=top_k or base.top_k)
    except ValueError as e:
        raise VispecError(str(e)) from None


class Drafter(Protocol):
    """What the loop needs of a drafter session (``vispec.runtime.drafters``)."""

    kind: str
    top_k: int

    def prefill(self, input_ids: np.ndarray, embeds: np.ndarray, features: np.ndarray,
                next_token: int) -> tuple[np.ndarray, np.ndarray]: ...

    def tree_step(self, tokens: np.ndarray, parent_rows: np.ndarray, mask: np.ndarray,
                  level: int) -> tuple[np.ndarray, np.ndarray]: ...

    def advance(self, features: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


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
    out = target.step(cache, target.embed(tree.tokens),
                      target.glue.step_position_ids(position, tree.depths),
                      tree_mask(past, tree.mask))
    verification = chooser.verify(tree, out.logits)
    cache.compact(past + verification.accepted, past)
    return verification, out


def generate_speculative(target: TargetModel, drafter: Drafter, prompt: Prompt,
                         max_new_tokens: int, *, tree: TreeConfig | None = None,
                         sampling: Sampling = Sampling(),
                         cache: KVCache | None = None) -> GenerationResult:
    """Speculative decoding; the output equals ``generate_plain``'s under greedy sampling."""
    config = tree or tree_config(drafter.kind, target.backend)
    if config.top_k > drafter.top_k:
        raise VispecError(f"tree top_k {config.top_k} > the drafter graph's top-k "
                         f"{drafter.top_k}. Hint: lower --top-k or re-export the drafter "
                         f"with a larger --top-k")
    cache = cache or target.new_cache()
    chooser = TokenChooser(sampling)
    run = start(target, cache, prompt, max_new_tokens, chooser, config.total_tokens)
    tokens, done, stats, state = run.tokens, run.done, run.stats, run.state
    t0 = time.perf_counter()
    topk = drafter.prefill(prompt.input_ids, state.embeds, state.out.hidden, tokens[-1])
    position = state.next_position
    while not done:
        draft_tree = draft(drafter, tokens[-1], topk, config)
        verification, out = verify(target, cache, draft_tree, position, chooser)
        new = accepted_tokens(draft_tree, verification)
        before = len(tokens)
        done = emit(tokens, new.tolist(), max_new_tokens, target.eos_token_ids)
        stats.target_passes += 1
        stats.accepted.append(len(tokens) - before)
        position += len(verification.accepted)
        if not done:
            topk = drafter.advance(out.hidden[verification.accepted], new)
    stats.decode_seconds = time.perf_counter() - t0
    return finish(target, tokens, stats)
