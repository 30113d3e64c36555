"""The user's cache folder of vispec-export: measured tree costs (``tree_calibration``) and
the demo's downloads, data and checkpoints (``exporter/real_*``)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$VISPEC_CACHE_DIR``, else ``$XDG_CACHE_HOME/vispec-export`` or
    ``~/.cache/vispec-export``."""
    if os.environ.get("VISPEC_CACHE_DIR"):
        return Path(os.environ["VISPEC_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vispec-export"
