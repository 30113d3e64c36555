"""The device-resident path (KV caches and step tensors in device allocations bound by
pointer, explicit counted copies) run on the CPU through ORT CPU ``OrtValue`` s: the same
code the CUDA provider runs, checked against the host numpy path."""
import numpy as np
import pytest

from vispec.runtime.backends.ort import ort_memory
from vispec.runtime.device import DeviceTensor, HostMemory
from vispec.runtime.drafters import open_drafter
from vispec.runtime.generate import generate_plain, prefill
from vispec.runtime.kv_cache import KVCache
from vispec.runtime.masks import causal_mask
from vispec.runtime.speculative import generate_speculative
from vispec.runtime.target import TargetModel
from vispec.runtime.tree import TreeConfig


@pytest.fixture(scope="module")
def device_pair(tiny_target, tiny_drafter):
    """``device_pair(family, kind) -> (host target, device target, device drafter)``."""
    opened = {}

    def get(family, kind):
        if (family, kind) not in opened:
            artifacts = tiny_target(family)[1]
            device = TargetModel(artifacts, memory=ort_memory("cpu"))
            drafter = open_drafter(tiny_drafter(kind, family)[1], device)
            opened[family, kind] = TargetModel(artifacts), device, drafter
        return opened[family, kind]

    return get


def test_cache_rows_are_pointer_views_and_compaction_matches_numpy():
    shape = (3, 2, 16, 2, 4)  # layers, k/v, max_len, kv heads, head dim
    host = KVCache(3, 2, 4, 16, np.float32, HostMemory())
    device = KVCache(3, 2, 4, 16, np.float32, ort_memory("cpu"))
    data = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    host.buffer[...] = data
    device.memory.from_host(device.buffer, data)
    for cache in (host, device):
        cache.commit(11)
    row_bytes = 2 * 4 * 4
    past, present = device.past(), device.present(3)
    assert isinstance(device.buffer, DeviceTensor) and device.buffer.device == "cpu"
    assert past["past_value.2"].ptr == device.buffer.ptr + (2 * 2 + 1) * 16 * row_bytes
    assert past["past_value.2"].shape == (1, 11, 2, 4)
    assert present["present_key.1"].ptr == device.buffer.ptr + (2 * 16 + 11) * row_bytes
    for cache in (host, device):
        cache.compact(np.array([4, 6, 7, 10]), 3)
    np.testing.assert_array_equal(device.to_host(), host.buffer)
    assert device.length == host.length == 7


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
@pytest.mark.parametrize("kind", ["vispec", "hivis", "eagle"])
def test_device_path_output_equals_host_plain_greedy(device_pair, noise_image, family, kind):
    host, device, drafter = device_pair(family, kind)
    for images in ([], [noise_image()]):
        prompt = host.prepare("Tell me a long story about the picture.", images)
        plain = generate_plain(host, prompt, 20).tokens
        assert generate_plain(device, prompt, 20).tokens == plain
        for tree in (TreeConfig(8, 2, 3), TreeConfig(16, 3, 4)):
            assert generate_speculative(device, drafter, prompt, 20, tree=tree).tokens == plain


def test_a_plain_step_moves_only_its_small_inputs_and_the_token(device_pair):
    host, device, _ = device_pair("llava", "eagle")
    prompt = host.prepare("Tell me a long story about a red boat and the sea.")
    caches = [t.new_cache() for t in (host, device)]
    for target, cache in zip((host, device), caches):
        state = prefill(target, cache, prompt)
    token = int(state.out.logits_row(-1).argmax())
    past = caches[1].length
    positions = device.glue.step_position_ids(state.next_position, np.zeros(1, np.int64))
    mask = causal_mask(past, 1)
    before = device.traffic.snapshot()
    out = device.step_tokens(caches[1], [token], positions, mask)
    chosen = out.argmax()
    moved = device.traffic.since(before)
    assert moved.h2d == 8 + positions.nbytes + mask.nbytes  # token id, positions, mask
    assert moved.d2h == 8                                   # the argmax, not the logits
    reference = host.step_tokens(caches[0], [token], positions, mask)
    assert chosen.tolist() == [int(reference.logits[-1].argmax())]
    assert host.traffic.total == 0  # host memory: the graphs read and write it in place
    written = caches[1].to_host()[:, :, :past + 1]
    np.testing.assert_allclose(written, caches[0].buffer[:, :, :past + 1], atol=1e-6)


def test_a_speculative_round_moves_far_less_than_the_cache(device_pair):
    _, device, drafter = device_pair("llava", "vispec")
    prompt = device.prepare("Tell me a long story about a red boat and the sea. " * 4)
    cache = device.new_cache()
    start = device.traffic.snapshot()
    result = generate_speculative(device, drafter, prompt, 24, tree=TreeConfig(8, 2, 3),
                                  cache=cache)
    per_round = device.traffic.since(start).total / result.stats.target_passes
    f = device.facts
    kv_bytes = cache.length * f["num_layers"] * 2 * f["kv_heads"] * f["head_dim"] * 4
    assert per_round < kv_bytes / 4  # a host cache would send all of it, twice, per pass


def test_gpu_benchmark_runs_its_whole_flow_on_the_cpu(tmp_path):
    """benchmarks/gpu.py --smoke: build, export, device-resident measurement, report (the
    GPU run differs only in shapes and provider)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[2] / "benchmarks" / "gpu.py"
    subprocess.run([sys.executable, str(script), "--smoke", "--repeats", "2", "--json",
                    str(tmp_path / "gpu.json")], check=True, capture_output=True, timeout=300)
    (result,) = json.loads((tmp_path / "gpu.json").read_text())["results"]
    assert set(result["verify_over_step"]) == {"1", "2", "4", "8", "16", "30", "64"}
    for tree in result["rounds"].values():
        assert tree["identical_to_plain"]
        assert 0 < tree["bytes_per_round"] < 64 * 1024  # hidden 128: rows, masks, ids only
