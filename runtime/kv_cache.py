"""Preallocated KV cache: one buffer per session, new rows written in place by the graph."""
from __future__ import annotations

import numpy as np

from .device import HostMemory, Memory
from .errors import PromptTooLongError
from .specs import past_names, present_names


class KVCache:
    """``buffer [layers, 2, max_len, kv_heads, head_dim]``; rows ``[0, length)`` are valid.

    Sequence-major per layer, so ``buffer[l, 0, :n]`` is a contiguous ``[n, kvh, hd]``
    block: the past inputs and the present outputs of a step graph bind straight onto
    views of this one allocation. ``memory`` says where it lives: a numpy array
    (``HostMemory``, the default) or one device allocation whose row views are bound by
    pointer (``DeviceMemory``); compaction then moves rows on the device.

    ``heads_major`` (the ``gqa`` LM form, host memory): ``buffer [layers, 2, kv_heads,
    max_len, head_dim]``, each layer's whole ``[1, kvh, max_len, hd]`` slab bound as both its
    past input and its present output (the graph writes the new rows at ``length``).
    """

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, max_len: int,
                 dtype=np.float32, memory: Memory | None = None, heads_major: bool = False):
        self.memory = memory or HostMemory()
        rows = (kv_heads, max_len) if heads_major else (max_len, kv_heads)
        self.buffer = self.memory.empty((num_layers, 2, *rows, head_dim), dtype)
        self.heads_major = heads_major
        self.num_layers = num_layers
        self.max_len = max_len
        self.length = 0
        # heads-major: the same slab views every step (a runner keeps them bound)
        self._slabs = {names: {name: self.buffer[layer, kind][None]
                               for layer in range(num_layers)
                               for kind, name in enumerate(names(layer))}
                       for names in (past_names, present_names)} if heads_major else None

    def past(self) -> dict:
        """Views ``[1, P, kvh, hd]`` of the valid rows (heads-major: the whole slabs), keyed
        by the past input names."""
        return self._views(past_names, 0, self.length)

    def present(self, n: int) -> dict:
        """Views of the next ``n`` rows (heads-major: the whole slabs), where a step graph
        writes the new K/V in place."""
        self.ensure_room(n)
        return self._views(present_names, self.length, self.length + n)

    def _views(self, names, start: int, stop: int) -> dict:
        if self.heads_major:
            return self._slabs[names]
        rows = self.memory.rows
        return {name: rows(self.buffer, (layer, kind), start, stop)
                for layer in range(self.num_layers)
                for kind, name in enumerate(names(layer))}

    def ensure_room(self, n: int) -> None:
        if self.length + n > self.max_len:
            raise PromptTooLongError(f"KV cache full: {self.length} + {n} rows > max_len "
                                     f"{self.max_len}. Hint: shorten the prompt or "
                                     f"max_new_tokens, or re-export with a larger --max-len")

    def commit(self, n: int) -> None:
        """Mark the ``n`` rows written after ``length`` as valid."""
        self.ensure_room(n)
        self.length += n

    def compact(self, rows: np.ndarray, start: int) -> None:
        """Move rows ``rows`` (absolute indices, ascending, each >= its destination) to
        ``start, start+1, ...`` for every layer, in place; the cache then ends there.

        Used after tree verification: the accepted nodes' K/V move to their final slots.
        """
        rows = np.asarray(rows, dtype=np.int64)
        dest = np.arange(start, start + len(rows))
        if len(rows) and (np.any(rows < dest) or np.any(np.diff(rows) <= 0)):
            raise ValueError("compact needs ascending source rows at or after their targets")
        moved = rows != dest
        if moved.any():
            self.memory.move_rows(self._sequence_major(self.buffer), rows[moved], dest[moved])
        self.length = start + len(rows)

    def _sequence_major(self, buffer):
        """``buffer`` seen as ``[layers, 2, max_len, kv_heads, head_dim]`` (a view)."""
        return buffer.swapaxes(2, 3) if self.heads_major else buffer

    def to_host(self) -> np.ndarray:
        """The whole buffer as a numpy array ``[layers, 2, max_len, kvh, hd]`` (a copy when
        it lives on a device; a view of the heads-major buffer)."""
        return self._sequence_major(self.memory.to_host(self.buffer))

    def truncate(self, length: int) -> None:
        """Forget rows from ``length`` on (the buffer is kept)."""
        self.length = min(self.length, length)

    def reset(self) -> None:
        self.length = 0
