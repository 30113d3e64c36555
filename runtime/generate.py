"""Plain greedy decoding through the runtime (the baseline the speculative loop must equal)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .errors import PromptTooLongError
from .families import Prompt
from .kv_cache import KVCache
from .masks import causal_mask
from .sampling import Sampling, TokenChooser
from .target import StepOutput, TargetModel


@dataclass
class GenerationStats:
    """Counts of one generation. ``target_passes`` includes the prefill; ``accepted`` holds,
    per target pass after the prefill, the tokens it emitted: accepted drafts plus the
    bonus token (always 1 for plain decoding)."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    target_passes: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    accepted: list[int] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        """Decode throughput (the prefill is reported apart)."""
        return self.new_tokens / self.decode_seconds if self.decode_seconds else 0.0

    @property
    def mean_accepted(self) -> float:
        """Mean tokens emitted per target pass after the prefill, bonus token included."""
        return float(np.mean(self.accepted)) if self.accepted else 0.0


@dataclass
class GenerationResult:
    tokens: list[int]
    text: str
    stats: GenerationStats


@dataclass
class Prefilled:
    """State after the prompt's pass: the first new token comes from ``out.logits[-1]``."""

    out: StepOutput
    embeds: np.ndarray  # [L, H] the prompt's LM-input embeddings (image features placed)
    next_position: int  # text position of the next token (M-RoPE offset included)


def check_fits(prompt: Prompt, max_new_tokens: int, max_len: int, reserve: int = 0) -> None:
    need = len(prompt.input_ids) + max_new_tokens + reserve
    if need > max_len:
        raise PromptTooLongError(
            f"prompt of {len(prompt.input_ids)} tokens + {max_new_tokens} new tokens"
            f"{f' + {reserve} draft-tree slots' if reserve else ''} = {need} > max_len "
            f"{max_len}. Hint: shorten the prompt, lower --max-new-tokens, or re-export "
            f"with a larger --max-len")


def prefill(target: TargetModel, cache: KVCache, prompt: Prompt) -> Prefilled:
    """Run the whole prompt (images merged) through the LM and commit its K/V."""
    embeds = target.prompt_embeds(prompt)
    positions, next_position = target.glue.position_ids(prompt)
    cache.reset()
    out = target.step(cache, embeds, positions, causal_mask(0, len(embeds)))
    cache.commit(len(embeds))
    return Prefilled(out, embeds, next_position)


def emit(tokens: list[int], new: list[int], max_new_tokens: int, eos: set[int]) -> bool:
    """Append ``new`` to ``tokens`` up to the budget or an EOS (kept); True when done."""
    for token in new:
        tokens.append(int(token))
        if token in eos or len(tokens) >= max_new_tokens:
            return True
    return False


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
          chooser: TokenChooser, reserve: int = 0) -> Started:
    """Check the budget (``reserve``: draft-tree slots), prefill, choose the first token."""
    check_fits(prompt, max_new_tokens, target.max_len, reserve)
    stats = GenerationStats(prompt_tokens=len(prompt.input_ids), target_passes=1)
    t0 = time.perf_counter()
    state = prefill(target, cache, prompt)
    stats.prefill_seconds = time.perf_counter() - t0
    tokens: list[int] = []
    done = emit(tokens, [chooser.choose(state.out.logits[-1])], max_new_tokens,
                target.eos_token_ids)
    return Started(state, tokens, done, stats)


def generate_plain(target: TargetModel, prompt: Prompt, max_new_tokens: int,
                   cache: KVCache | None = None,
                   sampling: Sampling = Sampling()) -> GenerationResult:
    """One token per target pass (greedy unless ``sampling`` says otherwise); stops at EOS
    (which is kept) or after ``max_new_tokens``."""
    cache = cache or target.new_cache()
    chooser = TokenChooser(sampling)
    run = start(target, cache, prompt, max_new_tokens, chooser)
    tokens, done, stats = run.tokens, run.done, run.stats
    position = run.state.next_position
    t0 = time.perf_counter()
    while not done:
        out = target.step(cache, target.embed(tokens[-1:]),
                          target.glue.step_position_ids(position, np.zeros(1, np.int64)),
                          causal_mask(cache.length, 1))
        cache.commit(1)
        position += 1
        done = emit(tokens, [chooser.choose(out.logits[-1])], max_new_tokens,
                    target.eos_token_ids)
        stats.target_passes += 1
        stats.accepted.append(1)
    stats.decode_seconds = time.perf_counter() - t0
    return finish(target, tokens, stats)
