"""GraphSpec: the one description of a graph's IO, and its checks of what the runtime feeds."""
import numpy as np
import pytest

from vispec.runtime.backends.base import GraphRunner
from vispec.runtime.errors import ShapeError
from vispec.runtime.masks import causal_mask
from vispec.runtime.specs import Dim, GraphSpec, TensorSpec, lm_step_spec, past_names


def spec(mrope=False):
    return lm_step_spec(num_layers=2, hidden_size=8, vocab_size=11, kv_heads=2, head_dim=4,
                        max_len=64, mrope=mrope)


def feeds(s, new=3, past=5, dtype=np.float32):
    out = {"inputs_embeds": np.zeros((1, new, 8), dtype), "position_ids": np.zeros((1, new), np.int64),
           "attention_mask": causal_mask(past, new)}
    for layer in range(2):
        for name in past_names(layer):
            out[name] = np.zeros((1, past, 2, 4), np.float32)
    return out


def test_valid_feeds_give_dim_sizes():
    assert spec().check_inputs(feeds(spec())) == {"new": 3, "past": 5}


@pytest.mark.parametrize("mutate, message", [
    (lambda f: f.update(inputs_embeds=f["inputs_embeds"].astype(np.float16)), "dtype float16"),
    (lambda f: f.update(position_ids=np.zeros((3, 1, 3), np.int64)), "Expected rank 2"),
    (lambda f: f.update(attention_mask=causal_mask(4, 3)), "attention_mask"),
    (lambda f: f.pop("past_key.1"), "missing inputs ['past_key.1']"),
    (lambda f: f.update(inputs_embeds=np.zeros((1, 3, 9), np.float32)), "inputs_embeds"),
])
def test_bad_feeds_are_named_precisely(mutate, message):
    f = feeds(spec())
    mutate(f)
    with pytest.raises(ShapeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        spec().check_inputs(f)


def test_dim_outside_profile_says_what_to_do():
    with pytest.raises(ShapeError, match=r"dim 'past' = 70 is outside .*\[0, 63\].*--max-len"):
        spec().check_inputs(feeds(spec(), new=1, past=70))


def test_inconsistent_dims_across_inputs():
    f = feeds(spec())
    f["past_value.0"] = np.zeros((1, 4, 2, 4), np.float32)
    with pytest.raises(ShapeError, match="other inputs say"):
        spec().check_inputs(f)


def test_profiles_resolve_sum_dims_and_mrope_positions():
    s = spec(mrope=True)
    assert s.profile("min")["attention_mask"] == (1, 1, 1, 1)
    assert s.profile("max")["attention_mask"] == (1, 1, 64, 127)
    assert s.profile("opt")["position_ids"] == (3, 1, 8)
    assert s.dynamic_axes()["attention_mask"] == {2: "new", 3: "past_plus_new"}


def test_round_trip_through_the_manifest_form():
    s = spec()
    again = GraphSpec.from_dict(s.to_dict())
    assert again == s and again.shape("logits", {"new": 4}) == (1, 4, 11)


def test_undeclared_dim_and_bad_ranges_are_refused():
    with pytest.raises(ValueError, match="undeclared dim"):
        GraphSpec("g", (TensorSpec("x", "float32", ("n",)),), (), ())
    with pytest.raises(ValueError, match="min <= opt <= max"):
        Dim("n", 4, 2, 8)
    with pytest.raises(ValueError, match="dtype"):
        TensorSpec("x", "float64", (1,))


class Recorder(GraphRunner):
    """A runner whose graph only records that it ran (the checks are what is tested)."""

    calls = 0

    def _infer_impl(self, feeds, outputs):
        self.calls += 1


def test_runner_checks_a_layout_fully_once_then_the_profile_every_call(monkeypatch):
    monkeypatch.delenv("VISPEC_FULL_CHECKS", raising=False)
    runner = Recorder(spec())
    runner.infer(feeds(spec(), past=5))
    assert runner.infer(feeds(spec(), past=9))["logits"].shape == (1, 3, 11)  # sizes per call
    with pytest.raises(ShapeError, match=r"dim 'past' = 70 is outside"):
        runner.infer(feeds(spec(), past=70))
    with pytest.raises(ShapeError, match="dtype float16"):  # a new layout: checked in full
        runner.infer(feeds(spec(), dtype=np.float16))
    bad = feeds(spec())
    bad["past_key.1"] = np.zeros((1, 4, 2, 4), np.float32)  # same layout, wrong past length
    runner.infer(bad)  # not re-checked
    assert runner.calls == 3


def test_full_checks_switch_checks_every_call(monkeypatch):
    monkeypatch.setenv("VISPEC_FULL_CHECKS", "1")
    runner = Recorder(spec())
    runner.infer(feeds(spec()))
    bad = feeds(spec())
    bad["past_key.1"] = np.zeros((1, 4, 2, 4), np.float32)
    with pytest.raises(ShapeError, match="past_key.1"):
        runner.infer(bad)
