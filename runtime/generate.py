"""Plain greedy decoding through the runtime (the baseline the speculative loop must equal)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .errors import PromptTooLongError, VispecError
from .families import Prompt
from .kv_cache import KVCache
from .masks import causal_mask
from .sampling import Sampling
from .target import StepOutput, TargetModel
from .tree import TreeConfig, tree_name

OnTokens = Callable[[list[int]], None]  # streaming: called with each pass's new tokens


@dataclass(frozen=True)
class RoundStats:
    """One decode pass after the prefill: the tree verified (``None``: a plain step), the
    milliseconds spent in drafter calls, in the target pass (verification included) and
    on the host otherwise (tree building, bookkeeping), and the tokens it emitted."""

    tree: TreeConfig | None
    draft_ms: float
    verify_ms: float
    host_ms: float
    emitted: int

    def to_dict(self) -> dict:
        tree = self.tree
        return {"tree": None if tree is None else [tree.total_tokens, tree.depth, tree.top_k],
                "draft_ms": round(self.draft_ms, 3), "verify_ms": round(self.verify_ms, 3),
                "host_ms": round(self.host_ms, 3), "emitted": self.emitted}


@dataclass
class GenerationStats:
    """Counts of one generation. ``target_passes`` includes the prefill; ``rounds`` holds
    one entry per target pass after it (``accepted``: the tokens each emitted, accepted
    drafts plus the bonus token; always 1 for plain decoding)."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    reused_tokens: int = 0   # prompt rows whose K/V a session's cache held already
    dropped_tokens: int = 0  # cached rows the prompt did not start with (prefilled anew)
    target_passes: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    rounds: list[RoundStats] = field(default_factory=list)

    @property
    def accepted(self) -> list[int]:
        return [r.emitted for r in self.rounds]

    @property
    def tokens_per_second(self) -> float:
        """Decode throughput: tokens after the first (which the prefill emits) per second."""
        decoded = sum(self.accepted)
        return decoded / self.decode_seconds if decoded and self.decode_seconds else 0.0

    @property
    def mean_accepted(self) -> float:
        """Mean tokens emitted per target pass after the prefill, bonus token included."""
        return float(np.mean(self.accepted)) if self.accepted else 0.0

    def rounds_per_tree(self) -> dict[str, int]:
        """Decode passes per tree name (``tree.tree_name``; "plain" for plain steps)."""
        return dict(Counter(tree_name(r.tree) for r in self.rounds))

    def to_dict(self, rounds: bool = True) -> dict:
        """JSON-ready summary (and, with ``rounds``, the per-round profile)."""
        out = {"prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens,
               "reused_tokens": self.reused_tokens, "dropped_tokens": self.dropped_tokens,
               "target_passes": self.target_passes,
               "time_to_first_token_s": round(self.prefill_seconds, 6),
               "decode_seconds": round(self.decode_seconds, 6),
               "decode_tokens_per_second": round(self.tokens_per_second, 3),
               "tokens_per_pass": round(self.mean_accepted, 4)}
        if rounds:
            out["rounds"] = [r.to_dict() for r in self.rounds]
        return out


@dataclass
class GenerationResult:
    tokens: list[int]
    text: str
    stats: GenerationStats


@dataclass
class Prefilled:
    """State after the prompt's pass: the first new token comes from ``out``'s last row
    (``TokenChooser.choose_next``)."""

    out: StepOutput
    embeds: np.ndarray  # [S, H] LM-input embeddings of the rows run (image features placed)
    next_position: int  # text position of the next token (M-RoPE offset included)


def check_fits(prompt: Prompt, max_new_tokens: int, max_len: int) -> None:
    """Refuse a generation the cache cannot hold (before any graph runs). Speculative
    generation needs no more: it ends plainly when a tree no longer fits."""
    if max_new_tokens < 1:
        raise VispecError(f"max_new_tokens={max_new_tokens}. Expected: >= 1. Hint: ask for "
                          f"at least one new token")
    need = len(prompt.input_ids) + max_new_tokens
    if need > max_len:
        raise PromptTooLongError(
            f"prompt of {len(prompt.input_ids)} tokens + {max_new_tokens} new tokens = {need} "
            f"> max_len {max_len}. Hint: shorten the prompt, lower --max-new-tokens, or "
            f"re-export with a larger --max-len")


def prefill(target: TargetModel, cache: KVCache, prompt: Prompt, keep: int = 0,
            greedy: bool = False) -> Prefilled:
    """Run the prompt (images merged) through the LM from token ``keep`` on, after the
    cache's first ``keep`` rows (which must hold the prompt's first ``keep`` tokens, not cut
    into an image), and commit its K/V. ``embeds``: the rows that ran; ``greedy``: only the
    last row's greedy token is wanted (``TargetModel.step``)."""
    embeds = target.prompt_embeds(target.glue.tail(prompt, keep) if keep else prompt)
    positions, next_position = target.glue.position_ids(prompt)
    cache.truncate(keep)
    out = target.step(cache, embeds, positions[..., keep:], causal_mask(keep, len(embeds)),
                      last_logits=True, greedy=greedy)
    cache.commit(len(embeds))
    return Prefilled(out, embeds, next_position)


def emit(tokens: list[int], new: list[int], max_new_tokens: int, eos: set[int],
         on_tokens: OnTokens | None = None) -> bool:
    """Append ``new`` to ``tokens`` up to the budget or an EOS (kept), hand what was
    appended to ``on_tokens``; True when done."""
    before, done = len(tokens), False
    for token in new:
        tokens.append(int(token))
        if token in eos or len(tokens) >= max_new_tokens:
            done = True
            break
    if on_tokens is not None:
        on_tokens(tokens[before:])
    return done


def generate_plain(target: TargetModel, prompt: Prompt, max_new_tokens: int,
                   cache: KVCache | None = None, sampling: Sampling = Sampling(),
                   on_tokens: OnTokens | None = None) -> GenerationResult:
    """One token per target pass (greedy unless ``sampling`` says otherwise); stops at EOS
    (which is kept) or after ``max_new_tokens``. ``on_tokens`` streams each new token.
    A one-generation ``session.Session``."""
    from .session import Session

    return Session(target, cache=cache).generate_plain(prompt, max_new_tokens,
                                                        sampling=sampling, on_tokens=on_tokens)
