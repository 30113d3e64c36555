"""Shared fixtures: tiny models of each family, built and exported once per session."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: any download attempt must fail

TEST_MAX_LEN = 256


def pytest_addoption(parser):
    parser.addoption("--stress", action="store_true",
                     help="run property tests on their full case sets (minutes), not CI's sample")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Every test runs offline: a connection attempt fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture(autouse=True, scope="session")
def private_cache_dir(tmp_path_factory):
    """Measured tree costs go to a folder of this test session, not the user's cache."""
    os.environ["VISPEC_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def tiny_target(tmp_path_factory):
    """``tiny_target(family) -> (model_dir, artifact_dir)``, built and exported once."""
    from vispec.exporter.export import export_target
    from vispec.exporter.fixtures.models import build_tiny_model

    built = {}

    def get(family: str):
        if family not in built:
            root = tmp_path_factory.mktemp(family)
            model_dir = build_tiny_model(family, root / "model")
            export_target(model_dir, root / "artifacts", max_len=TEST_MAX_LEN)
            built[family] = (model_dir, root / "artifacts")
        return built[family]

    return get


DRAFT_TOP_K = 4
DRAFTER_MAX_LEN = 256


@pytest.fixture(scope="session")
def tiny_drafter(tiny_target, tmp_path_factory):
    """``tiny_drafter(kind, family, seed=0) -> (drafter_dir, artifact_dir)``, built and
    exported once."""
    from vispec.exporter.drafters.export import export_drafter
    from vispec.exporter.fixtures.drafters import build_tiny_drafter

    built = {}

    def get(kind: str, family: str, seed: int = 0):
        if (kind, family, seed) not in built:
            model_dir, _ = tiny_target(family)
            root = tmp_path_factory.mktemp(f"{kind}-{family}-{seed}")
            drafter_dir = build_tiny_drafter(kind, model_dir, root / "drafter", seed=seed)
            export_drafter(drafter_dir, model_dir, root / "artifacts", top_k=DRAFT_TOP_K,
                           max_len=DRAFTER_MAX_LEN)
            built[kind, family, seed] = (drafter_dir, root / "artifacts")
        return built[kind, family, seed]

    return get


@pytest.fixture(scope="module")
def torch_one_thread():
    """Small models: torch's intra-op threads only add overhead (and spin on a busy machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def noise_image():
    """``noise_image(height=56, width=56, seed=0)`` -> a random RGB PIL image."""
    def make(height: int = 56, width: int = 56, seed: int = 0) -> Image.Image:
        rng = np.random.default_rng(seed)
        return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    return make


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder this process cannot write into: mode 0555 and, for root (whom modes do not
    stop), the immutable attribute; the test is skipped where neither holds."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    chattr = shutil.which("chattr")
    if os.access(folder, os.W_OK) and chattr:
        subprocess.run([chattr, "+i", str(folder)], capture_output=True)
    if os.access(folder, os.W_OK):
        folder.chmod(0o755)
        pytest.skip("no way to make a folder read-only for this user here")
    yield folder
    if chattr:
        subprocess.run([chattr, "-i", str(folder)], capture_output=True)
    folder.chmod(0o755)


@pytest.fixture
def assert_greedy_exact(noise_image):
    """``assert_greedy_exact(target, drafter)``: greedy speculative output equals plain greedy
    output on a text and an image prompt, with a small and a larger tree."""
    from vispec.runtime.generate import generate_plain
    from vispec.runtime.speculative import generate_speculative
    from vispec.runtime.tree import TreeConfig

    def check(target, drafter) -> None:
        for images in ([], [noise_image(56, 56, 3)]):
            prompt = target.prepare("Describe the red boat and what is around it.", images)
            plain = generate_plain(target, prompt, 24)
            for tree in (TreeConfig(8, 2, 2), TreeConfig(20, 3, 4)):
                spec = generate_speculative(target, drafter, prompt, 24, tree=tree)
                assert spec.tokens == plain.tokens, (len(images), tree)

    return check


def gpu_skip_reason(stack: str) -> str | None:
    """Why the GPU tests of ``stack`` ("ort-cuda" or "tensorrt") cannot run here; None when
    they can. Names a CPU onnxruntime wheel shadowing onnxruntime-gpu (then every CUDA test
    would otherwise skip without saying why)."""
    import importlib.util

    from vispec.runtime.backends.ort import CUDA, available_providers, shadowed_gpu_wheel
    from vispec.runtime.errors import VispecError

    if stack == "ort-cuda":
        if CUDA in available_providers():
            return None
        return shadowed_gpu_wheel() or "onnxruntime-gpu with a CUDA device is not installed"
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed (`pip install vispec-export[tensorrt]` on a GPU machine)"
    from vispec.runtime.backends.cuda import device_count
    try:
        return None if device_count() else "TensorRT is installed but CUDA sees no GPU"
    except VispecError as e:
        return f"TensorRT is installed but CUDA sees no GPU: {e}"


@pytest.fixture(scope="session")
def ort_cuda():
    """Skip (saying why) unless ONNX Runtime's CUDA provider can run."""
    reason = gpu_skip_reason("ort-cuda")
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def tensorrt_gpu():
    """Skip (saying why) unless TensorRT and a CUDA GPU are here."""
    reason = gpu_skip_reason("tensorrt")
    if reason:
        pytest.skip(reason)


def _gpu_status() -> tuple[bool, str]:
    """(any GPU stack usable, one line saying which)."""
    reasons = {stack: gpu_skip_reason(stack) for stack in ("ort-cuda", "tensorrt")}
    line = "; ".join(f"{stack}: {reason or 'available'}" for stack, reason in reasons.items())
    return any(r is None for r in reasons.values()), line


def pytest_report_header(config):
    return f"gpu tests: {_gpu_status()[1]}"


def pytest_collection_modifyitems(config, items):
    import torch

    usable, line = _gpu_status()
    skips = {"gpu": None if usable else pytest.mark.skip(reason=f"needs a GPU stack ({line})"),
             "torch_cuda": None if torch.cuda.is_available() else
             pytest.mark.skip(reason="needs torch with a CUDA GPU (this torch sees none)")}
    for item in items:
        for marker, skip in skips.items():
            if skip is not None and marker in item.keywords:
                item.add_marker(skip)
