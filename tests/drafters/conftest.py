"""Drafter fixtures: tiny drafters of every kind for tiny targets, exported once per session."""
from __future__ import annotations

import pytest


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
