"""Drafter fixtures: tiny drafters of every kind for tiny targets, exported once per session."""
from __future__ import annotations

import pytest

DRAFT_TOP_K = 4
DRAFTER_MAX_LEN = 256


@pytest.fixture(scope="session")
def tiny_drafter(tiny_target, tmp_path_factory):
    """``tiny_drafter(kind, family) -> (drafter_dir, artifact_dir)``, built and exported once."""
    from vispec.exporter.drafters.checkpoint import build_tiny_drafter
    from vispec.exporter.drafters.export import export_drafter

    built = {}

    def get(kind: str, family: str):
        if (kind, family) not in built:
            model_dir, _ = tiny_target(family)
            root = tmp_path_factory.mktemp(f"{kind}-{family}")
            drafter_dir = build_tiny_drafter(kind, model_dir, root / "drafter")
            export_drafter(drafter_dir, model_dir, root / "artifacts", top_k=DRAFT_TOP_K,
                           max_len=DRAFTER_MAX_LEN)
            built[kind, family] = (drafter_dir, root / "artifacts")
        return built[kind, family]

    return get


@pytest.fixture(scope="session")
def target_model(tiny_target):
    """``target_model(family) -> TargetModel`` over the exported tiny target."""
    from vispec.runtime.target import TargetModel

    opened = {}

    def get(family: str):
        if family not in opened:
            opened[family] = TargetModel(tiny_target(family)[1])
        return opened[family]

    return get


@pytest.fixture
def two_images(noise_image):
    """Two noise images: a prompt with two image runs and text between them."""
    return [noise_image(seed=1), noise_image(seed=2)]
