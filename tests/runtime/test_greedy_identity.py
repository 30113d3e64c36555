"""Plain greedy decoding through the ONNX Runtime backend == transformers' generate."""
import pytest

from vispec.exporter.fixtures.models import FAMILIES
from vispec.exporter.loading import load_target
from vispec.exporter.reference import hf_greedy
from vispec.runtime.generate import generate_plain
from vispec.runtime.target import TargetModel

PROMPTS = ("What is in the picture?", "Tell me a long story about a red boat and the sea.")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("n_images", [0, 1, 2])
def test_runtime_greedy_is_token_identical(tiny_target, noise_image, family, n_images):
    model_dir, artifacts = tiny_target(family)
    target = TargetModel(artifacts)
    adapter, _ = load_target(model_dir)
    images = [noise_image(56, 56, 1), noise_image(84, 56, 2)][:n_images]
    cache = target.new_cache()
    for text in PROMPTS:
        prompt = target.prepare(text, images)
        got = generate_plain(target, prompt, 24, cache=cache)
        assert got.tokens == hf_greedy(adapter, prompt, 24)
        assert got.stats.target_passes == len(got.tokens)
