"""Optimization profiles derived from the graph specs alone."""
import pytest

from vispec.engines.profiles import graph_profiles, profile_shapes, split_dim, to_polygraphy
from vispec.runtime.specs import Dim, embed_spec, lm_step_spec

MAX_LEN = 256


def lm_spec(max_len=MAX_LEN, mrope=True):
    return lm_step_spec(num_layers=2, hidden_size=32, vocab_size=64, kv_heads=2, head_dim=8,
                        max_len=max_len, mrope=mrope)


def test_lm_profile_is_min_opt_max_of_every_input_with_sum_dims():
    spec = lm_spec()
    shapes = profile_shapes(spec)
    assert set(shapes) == set(spec.input_names)
    assert shapes["inputs_embeds"] == ((1, 1, 32), (1, 8, 32), (1, MAX_LEN, 32))
    assert shapes["position_ids"] == ((3, 1, 1), (3, 1, 8), (3, 1, MAX_LEN))
    # key axis = past + new at each level
    assert shapes["attention_mask"] == ((1, 1, 1, 1), (1, 1, 8, 128 + 8),
                                        (1, 1, MAX_LEN, MAX_LEN - 1 + MAX_LEN))
    assert shapes["past_key.1"] == ((1, 0, 2, 8), (1, 128, 2, 8), (1, MAX_LEN - 1, 2, 8))
    for level, shape in zip(("min", "opt", "max"), zip(*shapes.values())):
        assert dict(zip(shapes, shape)) == spec.profile(level)


def test_split_new_into_decode_and_prefill_ranges():
    ranges = split_dim(Dim("new", 1, 8, MAX_LEN), [("decode", 64), ("prefill", None)])
    assert ranges == {"decode": Dim("new", 1, 8, 64), "prefill": Dim("new", 65, 65, MAX_LEN)}


def test_graph_profiles_narrow_new_and_keep_past():
    profiles = graph_profiles(lm_spec(), [("decode", 64), ("prefill", None)])
    assert list(profiles) == ["decode", "prefill"]
    decode, prefill = profiles["decode"], profiles["prefill"]
    assert decode["inputs_embeds"] == ((1, 1, 32), (1, 8, 32), (1, 64, 32))
    assert decode["attention_mask"][2] == (1, 1, 64, MAX_LEN - 1 + 64)
    assert prefill["attention_mask"][0] == (1, 1, 65, 65)
    assert decode["past_value.0"] == prefill["past_value.0"]


def test_ranges_beyond_the_dim_are_dropped_and_text_positions_are_2d():
    profiles = graph_profiles(lm_spec(max_len=32, mrope=False), [("decode", 64), ("prefill", None)])
    assert list(profiles) == ["decode"]
    assert profiles["decode"]["position_ids"] == ((1, 1), (1, 8), (1, 32))


def test_embed_spec_and_specs_without_the_dim():
    spec = embed_spec(hidden_size=16, max_len=MAX_LEN)
    assert graph_profiles(spec)["prefill"]["input_ids"] == ((1, 65), (1, 65), (1, MAX_LEN))
    assert list(graph_profiles(spec, [])) == ["all"]
    assert list(graph_profiles(spec, dim="patches")) == ["all"]


@pytest.mark.parametrize("splits", [[("decode", 64)], [("a", 64), ("b", 32), ("c", None)], []])
def test_bad_splits_are_refused(splits):
    with pytest.raises(ValueError, match="splits of dim 'new'"):
        split_dim(Dim("new", 1, 8, MAX_LEN), splits)


def test_polygraphy_profiles_without_tensorrt():
    profiles = to_polygraphy(graph_profiles(lm_spec()))
    assert len(profiles) == 2
    mask = profiles[1]["attention_mask"]
    assert (tuple(mask.min), tuple(mask.opt), tuple(mask.max)) == \
        ((1, 1, 65, 65), (1, 1, 65, 65 + 128), (1, 1, MAX_LEN, 2 * MAX_LEN - 1))
