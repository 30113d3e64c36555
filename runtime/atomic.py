"""Atomic artifact folders: written under a temporary name, renamed into place on success."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from .errors import VispecError


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary folder beside ``out_dir``; rename it into place on success only.

    On any error the temporary folder is removed: no partial artifacts are left behind.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise VispecError(f"{out_dir} already exists. Hint: pick a new folder or pass "
                          f"--overwrite")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
