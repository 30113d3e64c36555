"""Measured tree costs cached on disk: as readable as the umask lets any file be."""
import os
import stat

import pytest

from vispec.runtime import tree_calibration
from vispec.runtime.tree import TreeConfig


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_cached_costs_follow_the_umask(tmp_path, umask, mode):
    """The cache is written through mkstemp (private) and renamed into place."""
    path = tmp_path / "trees" / "key.json"
    costs = {"plain_ms": 1.0, "round_ms": {TreeConfig(8, 2, 3): 2.5}}
    old = os.umask(umask)
    try:
        tree_calibration._save(path, costs)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert tree_calibration._load(path, (TreeConfig(8, 2, 3),)) == costs
    assert [p.name for p in path.parent.iterdir()] == ["key.json"]
