"""The float LM head's greedy screen (``screen.onnx``): its bounds hold on ONNX Runtime's
kernel, its greedy tokens are the float head's, a target drops a screen that fails its
load-time check, and greedy steps skip the float head."""
import shutil
import warnings

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from vispec.exporter.export import export_target
from vispec.exporter.head_screen import BLOCK, build_head_screen, screen_parts
from vispec.runtime.backends import make_runner
from vispec.runtime.generate import generate_plain, prefill
from vispec.runtime.head_screen import MAX_ROWS, SCREEN, HeadScreen
from vispec.runtime.manifest import Manifest
from vispec.runtime.masks import causal_mask
from vispec.runtime.specs import SCREEN_CANDIDATES, SCREEN_FLOOR, SCREEN_UPPER, head_screen_spec
from vispec.runtime.target import TargetModel

VOCAB, HIDDEN = 3000, 128


def _weight(rng, q8: bool) -> np.ndarray:
    """A head ``[V, H]`` with uneven rows; ``q8``: on Q8_0's grid (8-bit blocks exact)."""
    w = (rng.standard_normal((VOCAB, HIDDEN)) * rng.uniform(0.2, 2, (VOCAB, 1)) * 0.05)
    if q8:
        blocks = w.reshape(VOCAB, -1, BLOCK)
        d = np.abs(blocks).max(-1, keepdims=True) / 127
        w = (np.rint(blocks / d) * d).reshape(VOCAB, HIDDEN)
    return w.astype(np.float32)


def _screen(tmp_path, weight: np.ndarray, name: str = "screen.onnx") -> HeadScreen:
    spec = head_screen_spec(hidden_size=HIDDEN, vocab_size=VOCAB, max_len=64)
    onnx.save_model(build_head_screen(weight, spec), str(tmp_path / name))
    return HeadScreen(make_runner("ort", tmp_path / name, spec, 1), weight)


def _states(rng, rows: int) -> np.ndarray:
    """Hidden states with a few outlier channels, as a real LM's final norm gives."""
    h = rng.standard_normal((rows, HIDDEN)).astype(np.float32)
    h[:, rng.choice(HIDDEN, 3, replace=False)] *= 20
    return h


@pytest.mark.parametrize("q8", [True, False])
def test_the_screens_bounds_hold_and_leave_few_candidates(tmp_path, q8):
    rng = np.random.default_rng(3)
    weight = _weight(rng, q8)
    _, _, bound = screen_parts(weight)
    blocks = HIDDEN // BLOCK
    rounding = np.abs(weight.astype(np.float64)).reshape(VOCAB, -1, BLOCK).sum(-1) / 254
    np.testing.assert_allclose(bound[:, blocks:], rounding, rtol=1e-3 if q8 else 2e-2)
    if q8:  # the weights' rounding term all but vanishes (float32 storage)
        assert bound[:, :blocks].max() < 1e-4 * rounding.max()
    else:
        assert bound[:, :blocks].min() > 0
    screen = _screen(tmp_path, weight)
    hidden = _states(rng, 24)
    out = screen.run(hidden)
    exact = hidden.astype(np.float64) @ weight.astype(np.float64).T
    assert np.all(exact <= out[SCREEN_UPPER]) and np.all(out[SCREEN_FLOOR][:, 0] <= exact.max(-1))
    np.testing.assert_array_equal(out[SCREEN_CANDIDATES], out[SCREEN_UPPER] >= out[SCREEN_FLOOR])
    assert out[SCREEN_CANDIDATES][np.arange(len(exact)), exact.argmax(-1)].all()
    candidates = out[SCREEN_CANDIDATES].sum(-1)
    assert np.median(candidates) < VOCAB / (50 if q8 else 10)  # tight enough to screen


def test_screened_greedy_tokens_are_the_float_heads(tmp_path):
    rng = np.random.default_rng(4)
    weight = _weight(rng, q8=True)
    screen = _screen(tmp_path, weight)
    hidden = _states(rng, 40)
    exact = hidden.astype(np.float64) @ weight.astype(np.float64).T
    np.testing.assert_array_equal(screen.argmax(hidden), exact.argmax(-1))
    candidates = screen.run(hidden)[SCREEN_CANDIDATES].sum(-1)
    assert candidates.max() < VOCAB // 20  # the exact scores are a handful of rows
    tied = hidden[:1].copy()  # two equal rows: the lowest id wins, as np.argmax
    w2 = weight.copy()
    best = int(exact[0].argmax())
    w2[best - 1] = w2[best]
    assert _screen(tmp_path, w2, "tied.onnx").argmax(tied)[0] == best - 1


def test_a_screen_whose_bounds_fail_is_caught_at_load(tmp_path):
    weight = _weight(np.random.default_rng(5), q8=True)
    assert _screen(tmp_path, weight).holds()
    model = build_head_screen(weight, head_screen_spec(hidden_size=HIDDEN, vocab_size=VOCAB,
                                                       max_len=64))
    for init in model.graph.initializer:  # a screen claiming exact logits
        if init.name in ("screen.bound", "screen.slack"):
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 0, init.name))
    onnx.save_model(model, str(tmp_path / "exact.onnx"))
    spec = head_screen_spec(hidden_size=HIDDEN, vocab_size=VOCAB, max_len=64)
    assert not HeadScreen(make_runner("ort", tmp_path / "exact.onnx", spec, 1), weight).holds()


@pytest.fixture(scope="module")
def screened(tiny_target, tmp_path_factory):
    """(standard float32 target, gqa float32 target with its head screen)."""
    model_dir, standard = tiny_target("llava")
    out = tmp_path_factory.mktemp("screen") / "gqa"
    export_target(model_dir, out, max_len=128, attention="gqa")
    return standard, out


def test_a_float_gqa_export_writes_the_screen_and_greedy_steps_skip_the_head(screened):
    standard, gqa = screened
    assert SCREEN in Manifest.load(gqa).graphs and SCREEN not in Manifest.load(standard).graphs
    target = TargetModel(gqa)
    assert target.screen is not None
    prompt = target.prepare("Describe the boat.")
    cache = target.new_cache()
    state = prefill(target, cache, prompt)
    full = target.step_tokens(cache, [5, 9, 11], np.arange(3)[None] + state.next_position,
                              causal_mask(cache.length, 3))
    greedy = target.step_tokens(cache, [5, 9, 11], np.arange(3)[None] + state.next_position,
                                causal_mask(cache.length, 3), greedy=True)
    assert greedy.raw_logits.shape[1] == 0  # the float head ran on no row
    np.testing.assert_array_equal(greedy.argmax(), full.logits.argmax(-1))
    np.testing.assert_array_equal(greedy.hidden, full.hidden)
    with pytest.raises(ValueError, match="greedy=False"):
        greedy.logits_row(-1)
    reference = TargetModel(standard)
    assert generate_plain(target, prompt, 24).tokens == \
        generate_plain(reference, reference.prepare("Describe the boat."), 24).tokens


def test_a_target_drops_a_screen_its_kernel_breaks(screened, tmp_path):
    _, gqa = screened
    broken = tmp_path / "broken"
    shutil.copytree(gqa, broken)
    model = onnx.load(str(broken / "screen.onnx"))
    for init in model.graph.initializer:
        if init.name in ("screen.bound", "screen.slack"):
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 0, init.name))
    onnx.save_model(model, str(broken / "screen.onnx"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        target = TargetModel(broken)
    assert target.screen is None
    assert any("float head" in str(w.message) for w in caught)
    prompt = target.prepare("Describe the boat.")
    assert generate_plain(target, prompt, 8).tokens == \
        generate_plain(TargetModel(gqa), prompt, 8).tokens


def test_sampling_keeps_the_float_head(screened):
    """Sampling needs every logit: its steps run the float head, as a target without a
    screen does (same draws, same tokens)."""
    from vispec.runtime.sampling import Sampling
    standard, gqa = screened
    sampling = Sampling(temperature=0.9, seed=7)
    runs = []
    for art in (gqa, standard):
        target = TargetModel(art)
        runs.append(generate_plain(target, target.prepare("Describe the boat."), 16,
                                   sampling=sampling).tokens)
    assert runs[0] == runs[1]


def test_steps_of_many_rows_keep_the_float_head(screened):
    """Past ``MAX_ROWS`` rows the 8-bit kernel is no faster than the float head: a greedy
    step that wide (a big tree) runs the float head; a prefill's greedy choice screens its
    last row only."""
    _, gqa = screened
    target = TargetModel(gqa)
    cache = target.new_cache()
    n = MAX_ROWS + 1
    wide = target.step_tokens(cache, np.arange(3, 3 + n), np.arange(n)[None],
                              causal_mask(0, n), greedy=True)
    assert wide.screen is None and wide.logits.shape[0] == n
    embeds = target.embed(np.arange(3, 3 + n))
    last = target.step(cache, embeds, np.arange(n)[None], causal_mask(0, n), last_logits=True,
                       greedy=True)
    assert last.screen is not None
    np.testing.assert_array_equal(last.argmax(), wide.logits[-1:].argmax(-1))
