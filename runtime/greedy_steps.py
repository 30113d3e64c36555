"""Plain greedy decode steps with every buffer bound once: ``Session``'s fast path for
ONNX Runtime ``gqa`` targets whose float embedding table is on the host.

A step copies one embedding row and one position into buffers bound at the start, rebinds
the mask (its length grows by one) and runs; the token is the argmax of the one logits row.
``TargetModel.step_tokens`` does the same through its general path (any rows, any memory,
checks, new output arrays): ~0.1 ms more host work a token, ~2-4% of an int4 step on a
2-core CPU, where the cache the weights evicted makes every Python call slow.
"""
from __future__ import annotations

import numpy as np

from .kv_cache import KVCache
from .masks import causal_mask
from .specs import (
    ATTENTION_MASK,
    HIDDEN_STATES,
    INPUTS_EMBEDS,
    LOGIT_ROWS,
    LOGITS,
    NEW,
    POSITION_IDS,
    ROWS,
)


class GreedySteps:
    """Greedy one-token steps of the LM ``runner`` (an ``OrtRunner``) on ``cache`` (heads-major
    slabs, bound once), token embeddings from ``table [V, H]``. ``selects_logits``: the graph
    takes the rows whose logits it computes (one here). ``rows`` 2: each step runs a padding
    row after the token (``TargetModel(exact=True)``: ``target.paired``). Made once per cache
    (``TargetModel.greedy_steps``: each past length's mask is wrapped once); the caller
    commits each step's row (``KVCache.commit``)."""

    def __init__(self, runner, table: np.ndarray, cache: KVCache, selects_logits: bool,
                 rows: int = 1):
        spec = runner.spec
        self.table, self.cache, self.rows = table, cache, rows
        self.embeds = np.empty((1, rows, table.shape[1]), spec.tensor(INPUTS_EMBEDS).np_dtype)
        self.positions = np.zeros((1, rows), np.int64)
        self.offsets = np.arange(rows)
        self.feeds = {INPUTS_EMBEDS: self.embeds, POSITION_IDS: self.positions,
                      ATTENTION_MASK: causal_mask(cache.length, rows), **cache.past()}
        sizes = {NEW: rows}
        if selects_logits:
            self.feeds[LOGIT_ROWS], sizes[ROWS] = np.zeros(1, np.int64), 1
        self.logits, self.hidden = (np.empty(spec.shape(name, sizes), spec.tensor(name).np_dtype)
                                    for name in (LOGITS, HIDDEN_STATES))
        self.step = runner.bound_step(self.feeds, {LOGITS: self.logits,
                                                   HIDDEN_STATES: self.hidden,
                                                   **cache.present(rows)})
        self.masks: dict[int, object] = {}  # past rows -> the decode mask as a bindable value

    def fits(self) -> bool:
        """Whether the cache has room for a step's rows (padding included)."""
        return self.cache.length + self.rows <= self.cache.max_len

    def __call__(self, token: int, position: int) -> int:
        """Run ``token`` at text position ``position`` after the cache's rows (its K/V land
        at ``cache.length``, not yet committed); returns the greedy next token."""
        self.cache.ensure_room(self.rows)
        np.copyto(self.embeds[0], self.table[token])
        np.add(self.offsets, position, out=self.positions[0])
        past = self.cache.length
        mask = self.masks.get(past)
        if mask is None:
            mask = self.masks[past] = self.step.value(causal_mask(past, self.rows))
        self.step.rebind_value(ATTENTION_MASK, mask)
        self.step.run()
        return int(self.logits[0, 0].argmax())
