"""generate and the drafters end to end on TensorRT (GPU only): fp32 engines built from
the tiny LLaVA export and its ViSpec / HiViS / EAGLE drafters; greedy output equals ONNX
Runtime CPU's, and speculative output equals plain output (both up to documented ties,
``runtime.ties``), through the Python API and the CLI."""
import json

import pytest
from click.testing import CliRunner

from vispec.runtime.device import DeviceTensor
from vispec.runtime.drafters import open_drafter
from vispec.runtime.generate import generate_plain
from vispec.runtime.speculative import generate_speculative
from vispec.runtime.target import TargetModel
from vispec.runtime.ties import first_divergence
from vispec.runtime.tree import TreeConfig

pytestmark = pytest.mark.gpu
PROMPT = "Tell me a long story about the picture."


@pytest.fixture(scope="module")
def engines(tensorrt_gpu, tiny_target, tiny_drafter, tmp_path_factory):
    """``engines(kind=None) -> folder``: fp32 engines of the tiny LLaVA target (kind None)
    or of its drafter ``kind``, built once."""
    from vispec.engines.build import BuildConfig, build_engines

    built = {}

    def get(kind=None):
        if kind not in built:
            source = tiny_target("llava")[1] if kind is None else tiny_drafter(kind, "llava")[1]
            built[kind] = build_engines(source, tmp_path_factory.mktemp(f"trt-{kind}"),
                                        BuildConfig(precision="fp32"))
        return built[kind]

    return get


@pytest.fixture(scope="module")
def targets(engines, tiny_target):
    """(ONNX Runtime CPU target, TensorRT target) of the tiny LLaVA export."""
    return TargetModel(tiny_target("llava")[1]), TargetModel(engines(), backend="tensorrt")


def assert_same_up_to_ties(target, prompt, got, want):
    divergence = first_divergence(target, prompt, got, want)
    assert divergence is None or divergence.is_tie, divergence


def test_plain_greedy_on_tensorrt_equals_onnxruntime_cpu(targets, noise_image):
    cpu, trt = targets
    for images in ([], [noise_image()]):
        prompt = cpu.prepare(PROMPT, images)
        want = generate_plain(cpu, prompt, 24).tokens
        assert_same_up_to_ties(cpu, prompt, generate_plain(trt, prompt, 24).tokens, want)
    # a tiny cache row is 128 bytes: present rows at odd lengths bind through aligned stand-ins
    assert trt.runners["lm"].io.staged > 0
    assert trt.runners["lm"].traffic is trt.traffic


@pytest.mark.parametrize("kind", ["vispec", "hivis", "eagle"])
def test_speculative_on_tensorrt_equals_plain(targets, engines, noise_image, kind):
    _, trt = targets
    drafter = open_drafter(engines(kind), trt, backend="tensorrt")
    assert isinstance(drafter.cache.buffer, DeviceTensor) and drafter.cache.buffer.device == "cuda"
    for images in ([], [noise_image()]):
        prompt = trt.prepare(PROMPT, images)
        plain = generate_plain(trt, prompt, 24).tokens
        for tree in (TreeConfig(8, 2, 3), TreeConfig(16, 3, 4)):
            got = generate_speculative(trt, drafter, prompt, 24, tree=tree)
            assert_same_up_to_ties(trt, prompt, got.tokens, plain)
    drafter.close()


def test_cli_generate_on_tensorrt(targets, engines):
    from vispec.exporter.cli import cli

    cpu, _ = targets
    result = CliRunner().invoke(cli, [
        "generate", "--model", str(engines()), "--drafter", str(engines("eagle")),
        "--backend", "tensorrt", "--prompt", PROMPT, "--max-new-tokens", "16",
        "--total-tokens", "8", "--json"])
    assert result.exit_code == 0, result.output
    reply = json.loads(result.stdout)
    assert reply["mode"].startswith("speculative (eagle")
    prompt = cpu.prepare(PROMPT)
    assert_same_up_to_ties(cpu, prompt, reply["tokens"], generate_plain(cpu, prompt, 16).tokens)
