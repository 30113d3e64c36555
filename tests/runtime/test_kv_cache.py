"""The preallocated KV cache: in-place writes by the graph, compaction, bounds."""
import numpy as np
import pytest

from vispec.runtime.errors import PromptTooLongError
from vispec.runtime.kv_cache import KVCache
from vispec.runtime.masks import causal_mask
from vispec.runtime.specs import present_names
from vispec.runtime.target import TargetModel


def _filled(max_len=16):
    cache = KVCache(num_layers=2, kv_heads=2, head_dim=3, max_len=max_len)
    cache.buffer[...] = np.arange(max_len, dtype=np.float32)[None, None, :, None, None]
    return cache


def test_compact_moves_rows_of_every_layer_in_place():
    cache = _filled()
    cache.length = 12
    buffer_id = id(cache.buffer)
    cache.compact(np.array([5, 7, 8, 11]), start=5)
    assert cache.length == 9
    assert id(cache.buffer) == buffer_id
    rows = cache.buffer[:, :, :9, 0, 0]
    np.testing.assert_array_equal(rows, np.broadcast_to([0, 1, 2, 3, 4, 5, 7, 8, 11], rows.shape))


def test_compact_rejects_rows_that_would_overwrite_sources():
    cache = _filled()
    with pytest.raises(ValueError):
        cache.compact(np.array([3, 2]), start=2)
    with pytest.raises(ValueError):
        cache.compact(np.array([1]), start=2)


def test_views_are_contiguous_slices_of_the_one_buffer():
    cache = _filled()
    cache.commit(4)
    for view in list(cache.past().values()) + list(cache.present(3).values()):
        assert view.flags.c_contiguous
        assert np.shares_memory(view, cache.buffer)
    assert cache.past()["past_key.1"].shape == (1, 4, 2, 3)


def test_full_cache_is_a_clear_error():
    cache = _filled(max_len=8)
    cache.commit(6)
    with pytest.raises(PromptTooLongError, match="max_len"):
        cache.present(3)


def test_step_writes_new_kv_into_the_cache(tiny_target):
    _, artifacts = tiny_target("llava")
    target = TargetModel(artifacts)
    cache = target.new_cache()
    embeds = target.embed(np.arange(5, 12))
    target.step(cache, embeds, np.arange(7)[None], causal_mask(0, 7))
    written = cache.buffer[:, :, :7].copy()
    assert np.abs(written).sum() > 0
    # the same step with separately allocated outputs gives the same K/V
    out = target.runners["lm"].infer({**{k: v for k, v in {
        "inputs_embeds": embeds[None], "position_ids": np.arange(7)[None],
        "attention_mask": causal_mask(0, 7)}.items()}, **cache.past()})
    k0, v0 = present_names(0)
    np.testing.assert_array_equal(out[k0][0], written[0, 0])
    np.testing.assert_array_equal(out[v0][0], written[0, 1])
