"""Atomic artifact folders: written under a temporary name, swapped into place on success.

A run writes ``.NAME.partial-PID-XXXX`` beside ``NAME``; on success its modes are set as
the umask asks (``mkdtemp`` and some writers make them private), the old ``NAME`` (if any)
is renamed to ``.NAME.old-PID-XXXX``, the new folder renamed into place, and the old one
deleted. Temporary folders of dead processes (a killed run) beside any output are swept by
the next run writing into the same folder.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterable

from .errors import VispecError
from .manifest import MANIFEST_NAME

MARKER = ".vispec-artifact"  # marks an output folder without a manifest as ours
_TEMPORARY = re.compile(r"\.(.+)\.(partial|old)-(\d+)-\w+")  # .NAME.partial-PID-XXXX


def check_writable(path: Path, what: str | os.PathLike) -> None:
    """Refuse to start a run whose output ``what`` could not be written: into ``path``, a
    folder, or over ``path``, an existing file."""
    if not os.access(path, os.W_OK | (os.X_OK if path.is_dir() else 0)):
        raise VispecError(f"cannot write {what}: {path} is not writable for this user. "
                          f"Hint: pick a location you can write to")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike) -> None:
    """Give ``path`` (a file, or a folder and everything in it) the modes a plain ``open`` /
    ``mkdir`` would have: ``mkstemp`` / ``mkdtemp`` (and writers built on them) make files
    private, which other users (a service, a container) then cannot read."""
    mask = _umask()
    path = Path(path)
    tree = [path] if not path.is_dir() else [path, *path.rglob("*")]
    for p in tree:
        if not p.is_symlink():
            full = 0o777 if p.is_dir() or p.stat().st_mode & 0o111 else 0o666
            os.chmod(p, full & ~mask)


def is_ours(path: Path) -> bool:
    """True for a folder written by vispec-export (a marker or a manifest inside)."""
    return path.is_dir() and ((path / MARKER).is_file() or (path / MANIFEST_NAME).is_file())


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool = False,
                     inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """``out_dir`` resolved, after refusing any folder a run must not write or replace:
    the current folder or one above it, a folder overlapping an input, a path under a
    file, an existing folder without ``overwrite`` or not written by us."""
    out, cwd = Path(out_dir).resolve(), Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        raise VispecError(f"output folder {out_dir} is the current folder or one above it. "
                          f"Hint: pass a new folder for the output")
    for given in inputs:
        source = Path(given).resolve()
        if out == source or out in source.parents or source in out.parents:
            raise VispecError(f"output folder {out_dir} overlaps the input {given}. Hint: "
                              f"write the output to a separate folder")
    parent = next(p for p in out.parents if p.exists())
    if not parent.is_dir():
        raise VispecError(f"cannot create {out_dir}: {parent} is a file. Hint: pick an output "
                          f"path under a folder")
    check_writable(parent, out_dir)
    if out.exists() and not overwrite:
        raise VispecError(f"{out_dir} already exists. Hint: pick a new folder or pass "
                          f"--overwrite")
    if out.exists() and not is_ours(out):
        raise VispecError(f"{out_dir} exists and was not written by vispec-export (no "
                          f"{MANIFEST_NAME} or {MARKER} in it), so --overwrite will not "
                          f"replace it. Hint: pick a new folder, or remove it yourself")
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(folder: Path) -> None:
    """Remove the temporary folders that dead runs left in ``folder``, whatever output they
    were for; an old output whose swap was cut short (its ``NAME`` missing) is put back."""
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        match = _TEMPORARY.fullmatch(path.name)
        if match is None or _alive(int(match[3])):
            continue
        out = folder / match[1]
        if match[2] == "old" and not out.exists():
            os.replace(path, out)
        else:
            shutil.rmtree(path, ignore_errors=True)


def _swap(new: Path, out: Path) -> None:
    """Rename ``new`` to ``out``; an existing ``out`` is deleted only once ``new`` is in
    place, and put back if that rename fails."""
    if not out.exists():
        os.replace(new, out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.replace(out, old)
    try:
        os.replace(new, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, overwrite: bool = False, *,
                      inputs: Iterable[str | os.PathLike] = ()):
    """Yield a temporary folder beside ``out_dir``; swap it into place on success only.

    ``inputs`` are the folders the run reads (never written or replaced). Checks run first
    (see :func:`check_output_dir`); on any error or interruption the temporary folder is
    removed and an existing ``out_dir`` is left as it was.
    """
    sweep_stale(Path(out_dir).resolve().parent)
    out = check_output_dir(out_dir, overwrite, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    try:
        yield tmp
        if not (tmp / MANIFEST_NAME).exists():
            (tmp / MARKER).write_text("written by vispec-export\n")
        apply_umask(tmp)
        _swap(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
