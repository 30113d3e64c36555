"""ONNX Runtime's CUDA provider runs the same graphs: parity and greedy identity with CPU."""
import numpy as np
import pytest

from vispec.runtime.backends.ort import CUDA, ort_memory
from vispec.runtime.generate import generate_plain
from vispec.runtime.target import TargetModel

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_cuda_provider_matches_cpu(ort_cuda, tiny_target, noise_image, family):
    _, artifacts = tiny_target(family)
    cpu, gpu = TargetModel(artifacts), TargetModel(artifacts, backend="ort-cuda")
    prompt = cpu.prepare("What is in the picture?", [noise_image()])
    np.testing.assert_allclose(gpu.prompt_embeds(prompt), cpu.prompt_embeds(prompt), atol=1e-4)
    assert generate_plain(gpu, prompt, 16).tokens == generate_plain(cpu, prompt, 16).tokens


def test_cuda_path_keeps_the_caches_on_the_device(ort_cuda, tiny_target, tiny_drafter, noise_image):
    """No per-step host copy of a KV cache: both caches are one CUDA allocation bound by
    pointer, and a plain step moves only the token, positions, mask and chosen id."""
    from vispec.runtime.device import DeviceTensor
    from vispec.runtime.drafters import open_drafter
    from vispec.runtime.generate import prefill
    from vispec.runtime.masks import causal_mask
    from vispec.runtime.speculative import generate_speculative
    from vispec.runtime.tree import TreeConfig

    _, artifacts = tiny_target("llava")
    cpu, gpu = TargetModel(artifacts), TargetModel(artifacts, backend="ort-cuda")
    drafter = open_drafter(tiny_drafter("vispec", "llava")[1], gpu)
    for cache in (gpu.new_cache(), drafter.cache):
        assert isinstance(cache.buffer, DeviceTensor) and cache.buffer.device == "cuda"
    prompt = cpu.prepare("What is in the picture?", [noise_image()])
    plain = generate_plain(cpu, prompt, 16).tokens
    assert generate_speculative(gpu, drafter, prompt, 16, tree=TreeConfig(8, 2, 3)).tokens == plain
    cache = gpu.new_cache()
    state = prefill(gpu, cache, prompt)
    positions = gpu.glue.step_position_ids(state.next_position, np.zeros(1, np.int64))
    mask = causal_mask(cache.length, 1)
    before = gpu.traffic.snapshot()
    gpu.step_tokens(cache, [plain[0]], positions, mask).argmax()
    moved = gpu.traffic.since(before)
    assert (moved.h2d, moved.d2h) == (8 + positions.nbytes + mask.nbytes, 8)


def test_cuda_sessions_run_without_tf32_on_the_memory_s_device(ort_cuda, tiny_target, noise_image):
    """TF32 would round fp32 matmuls to 10-bit mantissas: parity with the CPU needs it off.
    A target on GPU 1 (when there is one) runs its sessions, buffers and copies there."""
    from vispec.runtime.backends.cuda import device_count

    _, artifacts = tiny_target("llava")
    cpu = TargetModel(artifacts)
    prompt = cpu.prepare("What is in the picture?", [noise_image()])
    plain = generate_plain(cpu, prompt, 12).tokens
    for device_id in range(min(device_count(), 2)):
        with TargetModel(artifacts, backend="ort-cuda",
                         memory=ort_memory("cuda", device_id)) as gpu:
            for runner in gpu.runners.values():
                options = runner.session.get_provider_options()[CUDA]
                assert (options["use_tf32"], options["device_id"]) == ("0", str(device_id))
            assert gpu.new_cache().buffer.device_id == device_id
            assert generate_plain(gpu, prompt, 12).tokens == plain
