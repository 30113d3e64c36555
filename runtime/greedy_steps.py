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
    takes the rows whose logits it computes (one here). Made once per cache
    (``TargetModel.greedy_steps``: each past length's mask is wrapped once); the caller
    commits each step's row (``KVCache.commit``)."""

    def __init__(self, runner, table: np.ndarray, cache: KVCache, selects_logits: bool):
        spec = runner.spec
        self.table, self.cache = table, cache
        self.embeds = np.empty((1, 1, table.shape[1]), spec.tensor(INPUTS_EMBEDS).np_dtype)
        self.positions = np.zeros((1, 1), np.int64)
        self.feeds = {INPUTS_EMBEDS: self.embeds, POSITION_IDS: self.positions,
                      ATTENTION_MASK: causal_mask(cache.length, 1), **cache.past()}
        sizes = {NEW: 1}
        if selects_logits:
            self.feeds[LOGIT_ROWS], sizes[ROWS] = np.zeros(1, np.int64), 1
        self.logits, self.hidden = (np.empty(spec.shape(name, sizes), spec.tensor(name).np_dtype)
                                    for name in (LOGITS, HIDDEN_STATES))
        self.step = runner.bound_step(self.feeds, {LOGITS: self.logits,
                                                   HIDDEN_STATES: self.hidden,
                                                   **cache.present(1)})
        self.masks: dict[int, object] = {}  # past rows -> the decode mask as a bindable value

    def __call__(self, token: int, position: int) -> int:
        """Run ``token`` at text position ``position`` after the cache's rows (its K/V land
        at ``cache.length``, not yet committed); returns the greedy next token."""
        self.cache.ensure_room(1)
        np.copyto(self.embeds[0, 0], self.table[token])
        self.positions[0, 0] = position
        past = self.cache.length
        mask = self.masks.get(past)
        if mask is None:
            mask = self.masks[past] = self.step.value(causal_mask(past, 1))
        self.step.rebind_value(ATTENTION_MASK, mask)
        self.step.run()
        return int(self.logits[0, 0].argmax())
