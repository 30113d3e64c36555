"""Work split into chunks across the ranks of a run, each chunk written once, atomically.

    jobs 0..N-1 ─► chunk k = jobs [k*C, (k+1)*C)  ─► owned by rank k % world
    a finished chunk: FOLDER/chunk-00000k.npz (written as .chunk-00000k.partial, renamed)

The chunk file is the done-index: a restarted rank skips the chunks that exist and redoes
the one a kill cut short, so nothing is lost or written twice, whatever the world size of
the restart. ``meta.json`` holds the run's settings; a folder of other settings is refused.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from vispec.runtime.atomic import MARKER
from vispec.runtime.errors import VispecError

META = "meta.json"


def chunk_count(jobs: int, chunk: int) -> int:
    return -(-jobs // chunk)


def chunk_jobs(k: int, jobs: int, chunk: int) -> range:
    """The job indices of chunk ``k``."""
    return range(k * chunk, min(jobs, (k + 1) * chunk))


def owned_chunks(jobs: int, chunk: int, rank: int, world: int) -> list[int]:
    """The chunks rank ``rank`` of ``world`` computes: ``k % world == rank``."""
    return list(range(rank, chunk_count(jobs, chunk), world))


def chunk_path(folder: Path, k: int, suffix: str = ".npz") -> Path:
    return Path(folder) / f"chunk-{k:06d}{suffix}"


def missing_chunks(folder: Path, jobs: int, chunk: int, suffix: str = ".npz") -> list[int]:
    return [k for k in range(chunk_count(jobs, chunk))
            if not chunk_path(folder, k, suffix).is_file()]


def _partial(path: Path) -> Path:
    return path.with_name(f".{path.stem}.partial{path.suffix}")


def save_arrays(arrays: list[dict[str, np.ndarray]], path: Path) -> None:
    """Sequences of named arrays as one ``.npz`` (keys ``"{i}.{name}"``), written atomically."""
    flat = {f"{i}.{k}": v for i, a in enumerate(arrays) for k, v in a.items()}
    tmp = _partial(path)
    with open(tmp, "wb") as f:
        np.savez(f, **flat)
    os.replace(tmp, path)


def load_arrays(path: Path, keys: tuple[str, ...] | None = None) -> list[dict[str, np.ndarray]]:
    """The sequences ``save_arrays`` wrote (only the arrays named ``keys``, if given)."""
    with np.load(path) as data:
        out: dict[int, dict[str, np.ndarray]] = {}
        for name in data.files:
            i, k = name.split(".", 1)
            if keys is None or k in keys:
                out.setdefault(int(i), {})[k] = data[name]
    return [out[i] for i in sorted(out)]


def save_json(value, path: Path) -> None:
    """``value`` as JSON at ``path``, written atomically."""
    tmp = _partial(path)
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


def open_folder(folder: Path, settings: dict, overwrite: bool = False) -> None:
    """Create ``folder`` for a run of ``settings``, or check that it holds a run of the same
    settings (to resume it). ``overwrite`` empties an earlier run of other settings."""
    folder = Path(folder)
    meta = folder / META
    if folder.exists() and not folder.is_dir():
        raise VispecError(f"{folder} is a file. Expected: a folder for the data. Hint: pick a "
                          f"new folder name")
    if meta.is_file():
        found = json.loads(meta.read_text())
        if found == settings:
            return
        if not overwrite:
            changed = sorted(k for k in set(found) | set(settings) if found.get(k) != settings.get(k))
            raise VispecError(f"{folder} holds a run of other settings (differing: "
                              f"{', '.join(changed)}). Expected: the settings it was started "
                              f"with, to resume it. Hint: pass the same options, a new folder, "
                              f"or --overwrite to start over")
        for path in folder.rglob("*"):
            if path.is_file():
                path.unlink()
    elif folder.exists() and any(folder.iterdir()):
        raise VispecError(f"{folder} exists and is not a vispec-export data folder (no {META})."
                          f" Hint: pick a new or empty folder")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).touch()
    save_json(settings, meta)


def read_settings(folder: Path) -> dict:
    meta = Path(folder) / META
    if not meta.is_file():
        raise VispecError(f"{folder} holds no distillation data ({META} missing). Hint: make it "
                          f"with `vispec-export distill-data MODEL_DIR {folder}`")
    return json.loads(meta.read_text())


def remove_partials(folder: Path) -> None:
    """Delete the half-written chunks that killed runs left (call when no rank writes)."""
    for path in Path(folder).rglob(".chunk-*.partial*"):
        path.unlink(missing_ok=True)
