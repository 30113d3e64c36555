"""Plain greedy decoding through the runtime (the baseline the speculative loop must equal)."""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .errors import PromptTooLongError, VispecError
from .families import Prompt
from .kv_cache import KVCache
from .masks import causal_mask
from .sampling import Sampling, TokenChooser
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
    """State after the prompt's pass: the first new token comes from ``out.logits_row(-1)``."""

    out: StepOutput
    embeds: np.ndarray  # [L, H] the prompt's LM-input embeddings (image features placed)
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


def prefill(target: TargetModel, cache: KVCache, prompt: Prompt) -> Prefilled:
    """Run the whole prompt (images merged) through the LM and commit its K/V."""
    embeds = target.prompt_embeds(prompt)
    positions, next_position = target.glue.position_ids(prompt)
    cache.reset()
    out = target.step(cache, embeds, positions, causal_mask(0, len(embeds)))
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


def finish(target: TargetModel, tokens: list[int], stats: GenerationStats) -> GenerationResult:
    stats.new_tokens = len(tokens)
    text = target.processor.tokenizer.decode(tokens, skip_special_tokens=True)
    return GenerationResult(tokens, text, stats)


@dataclass
class Started:
    """A generation after its prefill pass and first token."""

    state: Prefilled
    tokens: list[int]
    done: bool
    stats: GenerationStats


def start(target: TargetModel, cache: KVCache, prompt: Prompt, max_new_tokens: int,
          chooser: TokenChooser, on_tokens: OnTokens | None = None) -> Started:
    """Check the budget, prefill, choose the first token."""
    check_fits(prompt, max_new_tokens, target.max_len)
    stats = GenerationStats(prompt_tokens=len(prompt.input_ids), target_passes=1)
    t0 = time.perf_counter()
    state = prefill(target, cache, prompt)
    stats.prefill_seconds = time.perf_counter() - t0
    tokens: list[int] = []
    done = emit(tokens, [chooser.choose(state.out.logits_row(-1))], max_new_tokens,
                target.eos_token_ids, on_tokens)
    return Started(state, tokens, done, stats)


def decode_plain(target: TargetModel, cache: KVCache, tokens: list[int], position: int,
                 chooser: TokenChooser, max_new_tokens: int, stats: GenerationStats,
                 on_tokens: OnTokens | None = None) -> None:
    """One token per target pass from ``position`` (the text position of ``tokens[-1]``)
    until EOS or the budget; appends to ``tokens`` and ``stats.rounds``."""
    done = False
    while not done:
        t0 = time.perf_counter()
        out = target.step_tokens(cache, tokens[-1:],
                                 target.glue.step_position_ids(position, np.zeros(1, np.int64)),
                                 causal_mask(cache.length, 1))
        t1 = time.perf_counter()
        cache.commit(1)
        position += 1
        done = emit(tokens, [chooser.choose_next(out)], max_new_tokens,
                    target.eos_token_ids, on_tokens)
        stats.target_passes += 1
        stats.rounds.append(RoundStats(None, 0.0, (t1 - t0) * 1e3,
                                       (time.perf_counter() - t1) * 1e3, 1))


def generate_plain(target: TargetModel, prompt: Prompt, max_new_tokens: int,
                   cache: KVCache | None = None, sampling: Sampling = Sampling(),
                   on_tokens: OnTokens | None = None) -> GenerationResult:
    """One token per target pass (greedy unless ``sampling`` says otherwise); stops at EOS
    (which is kept) or after ``max_new_tokens``. ``on_tokens`` streams each new token."""
    cache = cache or target.new_cache()
    chooser = TokenChooser(sampling)
    run = start(target, cache, prompt, max_new_tokens, chooser, on_tokens=on_tokens)
    t0 = time.perf_counter()
    if not run.done:
        decode_plain(target, cache, run.tokens, run.state.next_position, chooser,
                     max_new_tokens, run.stats, on_tokens)
    run.stats.decode_seconds = time.perf_counter() - t0
    return finish(target, run.tokens, run.stats)
