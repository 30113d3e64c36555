"""Runtime fixtures: tiny targets opened with their drafters."""
import pytest

from vispec.runtime.drafters import open_drafter
from vispec.runtime.target import TargetModel


@pytest.fixture(scope="session")
def runtime_pair(tiny_target, tiny_drafter):
    """``runtime_pair(family, kind, seed) -> (TargetModel, DrafterSession)``, opened once."""
    opened, targets = {}, {}

    def get(family, kind, seed=0):
        if family not in targets:
            targets[family] = TargetModel(tiny_target(family)[1])
        if (family, kind, seed) not in opened:
            _, artifacts = tiny_drafter(kind, family, seed)
            opened[family, kind, seed] = open_drafter(artifacts, targets[family])
        return targets[family], opened[family, kind, seed]

    return get
