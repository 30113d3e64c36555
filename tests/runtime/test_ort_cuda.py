"""ONNX Runtime's CUDA provider runs the same graphs: parity and greedy identity with CPU."""
import numpy as np
import onnxruntime
import pytest

from vispec.runtime.generate import generate_plain
from vispec.runtime.target import TargetModel

pytestmark = pytest.mark.gpu


@pytest.fixture
def cuda():
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu with a CUDA device is not installed")


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_cuda_provider_matches_cpu(cuda, tiny_target, noise_image, family):
    _, artifacts = tiny_target(family)
    cpu, gpu = TargetModel(artifacts), TargetModel(artifacts, backend="ort-cuda")
    prompt = cpu.prepare("What is in the picture?", [noise_image()])
    np.testing.assert_allclose(gpu.prompt_embeds(prompt), cpu.prompt_embeds(prompt), atol=1e-4)
    assert generate_plain(gpu, prompt, 16).tokens == generate_plain(cpu, prompt, 16).tokens
