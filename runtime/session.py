"""One conversation's decoding state: its caches, the tokens in them, positions, sampling.

    session = Session(target, drafter)
    session.generate_speculative(turn_1, 64, tree=policy)  # prefill the prompt, decode the reply
    session.generate_speculative(turn_2, 64, tree=policy)  # turn_2 = turn 1, its reply, a new
                                                           # user turn: only the rows after the
                                                           # cached ones run
A prompt is compared with the cached rows token by token (images by their pixels): the
rows up to the first difference are kept, the others dropped, and the prompt's rest is
prefilled (new images through the vision graph). Kept rows hold exactly what a fresh
prefill would compute, so the output equals generating on the whole prompt from scratch.
The drafter's prompt rows continue from where its previous prompt ended (its last row,
which embedded x_L by id, and the rows drafted after it are replaced); when they cannot
(another prompt since, or an image among the rows to re-embed) the turn starts afresh.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .acceptance import accepted_tokens
from .families import Prompt
from .generate import (
    GenerationResult,
    GenerationStats,
    OnTokens,
    RoundStats,
    check_fits,
    emit,
    prefill,
)
from .kv_cache import KVCache
from .lookup import LookupGate, graft, lookup_chain
from .masks import causal_mask
from .sampling import Sampling, TokenChooser
from .speculative import (
    Drafter,
    check_tree_size,
    check_tree_width,
    draft,
    fits_caches,
    fitting,
    verify,
)
from .target import StepOutput, TargetModel
from .tree import DraftTree, TreeConfig
from .tree_policy import TreePolicy, check_chains

Cancel = Callable[[], bool]  # polled after every target pass: True ends the generation


@dataclass
class Turn:
    """One generation's running state."""

    max_new_tokens: int
    chooser: TokenChooser
    stats: GenerationStats
    on_tokens: OnTokens | None = None
    cancel: Cancel | None = None
    tokens: list[int] = field(default_factory=list)
    done: bool = False

    def emit(self, new: list[int], eos: set[int]) -> None:
        """Append a pass's tokens (streamed); done at EOS, the budget or a cancel."""
        self.done = emit(self.tokens, new, self.max_new_tokens, eos, self.on_tokens)
        self.done = self.done or (self.cancel is not None and self.cancel())


class Session:
    """The target's KV cache and the token of every valid row (``rows``), the images among
    them, the text position of the next row, and, with a drafter, the target's features of
    every row (what a later turn's drafter rows read). The last token a generation emits is
    not in the cache yet: a next turn's prompt feeds it.

    ``lookup`` N > 0: greedy rounds also verify up to N tokens that ``lookup.lookup_chain``
    finds in the conversation, grafted onto the drafter's tree where ``lookup_gate`` finds
    it pays (not on ``exact`` targets, which verify chains only).
    """

    def __init__(self, target: TargetModel, drafter: Drafter | None = None,
                 cache: KVCache | None = None, lookup: int = 0):
        self.target, self.drafter, self.lookup = target, drafter, lookup
        self.lookup_gate = LookupGate()  # learns across this session's generations
        self.cache = cache or target.new_cache()
        self.reset()
        rows = (target.max_len, target.glue.hidden_size)  # host, row-aligned, with a drafter:
        self.features = None if drafter is None else np.empty(rows, np.float32)  # target's
        self.embeds = None if drafter is None else np.empty(rows, np.float32)  # LM inputs
        self.embedded = np.zeros(target.max_len, bool)  # embeds held (prefilled rows)
        self._drafter_mark = None  # drafter.prefills when its prompt rows were this session's

    def reset(self) -> None:
        """Forget the conversation (the next prompt is prefilled afresh)."""
        self.cache.reset()
        self.rows, self.images, self.position, self._drafter_mark = [], (), 0, None

    # -- generation ----------------------------------------------------------------------------
    def generate_plain(self, prompt: Prompt, max_new_tokens: int, *,
                       sampling: Sampling = Sampling(), on_tokens: OnTokens | None = None,
                       cancel: Cancel | None = None) -> GenerationResult:
        """One token per target pass; stops at EOS (kept), the budget or ``cancel``."""
        check_fits(prompt, max_new_tokens, self.target.max_len)
        turn = Turn(max_new_tokens, TokenChooser(sampling), GenerationStats(), on_tokens, cancel)
        with self._consistent():
            self._start(prompt, turn)
            t0 = time.perf_counter()
            self._decode_plain(turn)
        return self._finish(turn, t0)

    def generate_speculative(self, prompt: Prompt, max_new_tokens: int, *, tree: TreePolicy,
                             sampling: Sampling = Sampling(), on_tokens: OnTokens | None = None,
                             cancel: Cancel | None = None) -> GenerationResult:
        """Speculative decoding; the output equals ``generate_plain``'s under greedy sampling.

        ``tree``: the policy picking each round's tree: a ``TreeConfig`` (that tree every
        round) or, e.g., ``AutoTree``, which may switch to plain decoding for the rest of the
        generation (``tree_policy.resolve_tree`` makes one from a user's setting).
        """
        check_fits(prompt, max_new_tokens, self.target.max_len)
        check_tree_width(tree.trees, self.drafter)
        check_tree_size(tree.trees, self.target.max_len)
        check_chains(tree.trees, self.target)
        tree.start(prompt.has_images, max_new_tokens)
        turn = Turn(max_new_tokens, TokenChooser(sampling), GenerationStats(), on_tokens, cancel)
        with self._consistent():
            drafter_start = self._start(prompt, turn)
            t0 = time.perf_counter()
            config = None if turn.done else tree.next_tree()
            if config is not None:
                topk = self._draft_prompt(prompt, drafter_start, turn.tokens[-1])
                self._speculate(turn, tree, fitting(config, self.cache, self.drafter), topk)
            self._decode_plain(turn)  # plain is faster, or no tree fits the caches any more
        tree.end(len(turn.tokens), turn.tokens[-1] in self.target.eos_token_ids)
        return self._finish(turn, t0)

    # -- steps ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _consistent(self):
        """On any failure mid-generation forget the conversation (rows and cache may differ)."""
        try:
            yield
        except BaseException:
            self.reset()
            raise

    def _start(self, prompt: Prompt, turn: Turn) -> int:
        """Prefill what the cache lacks of the prompt, choose the first token. Returns
        where the drafter's rows for this prompt start (``_drafter_start``)."""
        keep = self.reusable(prompt)
        drafter_start = self._drafter_start(keep) if self.drafter is not None else 0
        stats = turn.stats
        stats.prompt_tokens, stats.target_passes = len(prompt.input_ids), 1
        stats.reused_tokens, stats.dropped_tokens = keep, len(self.rows) - keep
        t0 = time.perf_counter()
        state = prefill(self.target, self.cache, prompt, keep, turn.chooser.sampling.greedy)
        del self.rows[keep:]
        self.rows.extend(prompt.input_ids[keep:].tolist())
        self.images, self.position = prompt.images, state.next_position
        if self.features is not None:
            self.features[keep:len(self.rows)] = state.out.hidden
            self.embeds[keep:len(self.rows)] = state.embeds
            self.embedded[keep:len(self.rows)] = True
        first = turn.chooser.choose_next(state.out)
        stats.prefill_seconds = time.perf_counter() - t0  # to the first token, chosen
        turn.emit([first], self.target.eos_token_ids)
        return drafter_start

    def reusable(self, prompt: Prompt) -> int:
        """Cached rows ``prompt`` starts with: the common prefix of its tokens and the
        cached ones, cut before the first image whose pixels differ from the cached one's,
        and short of the whole prompt (the last row's logits give the first token)."""
        ids = prompt.input_ids
        n = min(len(self.rows), len(ids) - 1)
        differ = np.flatnonzero(np.asarray(self.rows[:n], np.int64) != ids[:n])
        keep = int(differ[0]) if len(differ) else n
        slots = self.target.glue.image_slots(prompt)
        same = 0  # leading images known to equal the cached ones
        if len(slots) == len(prompt.images):
            while (same < min(len(self.images), len(prompt.images))
                   and self.images[same] == prompt.images[same]):
                same += 1
        unmatched = [slot for slot in slots[same:] if slot < keep]
        return unmatched[0] if unmatched else keep

    def _drafter_start(self, keep: int) -> int:
        """Row where the drafter's rows of a prompt that keeps ``keep`` cached rows begin:
        where its previous prompt rows end, when those are this session's and lie within
        the kept rows; else 0 (the drafter's rows are built anew)."""
        d = self.drafter
        if self._drafter_mark is not None and (self._drafter_mark != d.prefills
                                               or d.prompt_end > keep):
            self._drafter_mark = None
        return 0 if self._drafter_mark is None else d.prompt_end

    def _draft_prompt(self, prompt: Prompt, start: int,
                      next_token: int) -> tuple[np.ndarray, np.ndarray]:
        """The drafter's prompt rows from ``start``: the target's LM-input embeddings and
        features of those rows (decoded rows are embedded from their tokens now)."""
        ids, end = prompt.input_ids, len(prompt.input_ids)
        missing = start + np.flatnonzero(~self.embedded[start:end])
        if len(missing):
            self.embeds[missing] = self.target.embed(np.asarray(self.rows)[missing])
            self.embedded[missing] = True
        topk = self.drafter.prefill(ids, self.embeds[start:end], self.features[start:end],
                                    next_token, *([start] if start else []))
        self._drafter_mark = self.drafter.prefills
        return topk

    def _speculate(self, turn: Turn, policy: TreePolicy, config: TreeConfig | None,
                   topk: tuple[np.ndarray, np.ndarray]) -> None:
        """Rounds of draft, verify, accept while the policy picks a tree that fits."""
        while not turn.done and config is not None:
            r0 = time.perf_counter()
            draft_tree = draft(self.drafter, turn.tokens[-1], topk, config)
            drafted, images = len(draft_tree.tokens), bool(self.images)
            if (self.lookup and turn.chooser.sampling.greedy and not self.target.exact
                    and self.lookup_gate.wanted(images)):
                draft_tree = self._with_lookup(draft_tree, turn.tokens[-1])
            r1 = time.perf_counter()
            verification, out = verify(self.target, self.cache, draft_tree, self.position,
                                       turn.chooser)
            r2 = time.perf_counter()
            if len(draft_tree.tokens) > drafted:
                self.lookup_gate.observe(images, len(draft_tree.tokens) - drafted,
                                         int((verification.accepted >= drafted).sum()))
            new = accepted_tokens(draft_tree, verification)
            before = len(turn.tokens)
            features = self._commit(draft_tree.tokens[verification.accepted], out,
                                    verification.accepted)
            turn.emit(new.tolist(), self.target.eos_token_ids)
            turn.stats.target_passes += 1
            policy.observe(config, len(verification.accepted) - 1)
            used, r3 = config, time.perf_counter()
            if not turn.done:
                config = policy.next_tree()
                if config is not None:
                    topk = self.drafter.advance(features, new)
                    config = fitting(config, self.cache, self.drafter)
            r4 = time.perf_counter()
            turn.stats.rounds.append(RoundStats(used, (r1 - r0 + r4 - r3) * 1e3, (r2 - r1) * 1e3,
                                                (r3 - r2) * 1e3, len(turn.tokens) - before))

    def _with_lookup(self, tree: DraftTree, root: int) -> DraftTree:
        """``tree`` with the lookup branch grafted on (``lookup.graft``), where both caches
        have room for the grown tree and its longest accepted path."""
        chain = lookup_chain(np.array(self.rows + [root], np.int64), self.lookup)
        if not len(chain):
            return tree
        grown = graft(tree, chain)
        rows = int(grown.depths.max()) + 2  # the longest path and the bonus, one row spare
        return grown if fits_caches(self.cache, self.drafter, len(grown.tokens), rows) else tree

    def _decode_plain(self, turn: Turn) -> None:
        """One token per target pass from the last emitted token until the turn is done
        (greedy: ``TargetModel.greedy_steps`` where they serve)."""
        target, cache = self.target, self.cache
        greedy = turn.chooser.sampling.greedy
        steps = target.greedy_steps(cache) if greedy else None
        while not turn.done:
            t0 = time.perf_counter()
            bound = steps is not None and steps.fits()  # an exact step's padding row too
            if bound:
                token, out = steps(turn.tokens[-1], self.position), steps.hidden[0, :1]
            else:
                out = target.step_tokens(cache, turn.tokens[-1:],
                                         target.glue.step_position_ids(self.position,
                                                                       np.zeros(1, np.int64)),
                                         causal_mask(cache.length, 1), greedy=greedy)
            t1 = time.perf_counter()
            cache.commit(1)
            self._commit(turn.tokens[-1:], out, [0])
            if not bound:
                token = turn.chooser.choose_next(out)
            turn.emit([token], target.eos_token_ids)
            turn.stats.target_passes += 1
            turn.stats.rounds.append(RoundStats(None, 0.0, (t1 - t0) * 1e3,
                                                (time.perf_counter() - t1) * 1e3, 1))

    def _commit(self, tokens, out: StepOutput | np.ndarray, out_rows) -> np.ndarray | None:
        """Book rows just committed to the cache: their tokens, the next position, and with
        a drafter their features (``out``'s rows ``out_rows``, or ``out`` itself when it is
        those rows' final hidden states ``[n, H]``; returned)."""
        start = len(self.rows)
        self.rows.extend(int(t) for t in tokens)
        self.position += len(self.rows) - start
        if self.features is None:
            return None
        features = out if isinstance(out, np.ndarray) else out.hidden_rows(out_rows)
        self.features[start:len(self.rows)] = features
        self.embedded[start:len(self.rows)] = False
        return features

    def _finish(self, turn: Turn, t0: float) -> GenerationResult:
        turn.stats.decode_seconds = time.perf_counter() - t0
        turn.stats.new_tokens = len(turn.tokens)
        text = self.target.processor.tokenizer.decode(turn.tokens, skip_special_tokens=True)
        return GenerationResult(turn.tokens, text, turn.stats)
