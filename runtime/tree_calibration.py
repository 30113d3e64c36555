"""Measure what a round of each candidate tree costs on this machine, once, and cache it.

The costs are real rounds of the speculative loop (draft + verify + host) and real plain
steps on a short canned prompt: after a warm-up run of each setting, many short passes over
plain decoding and every tree in turn, each pass in another order (this machine's speed
drifts by 10-30% within seconds: short interleaved passes spread a drift over every
setting alike), the median of each setting's rounds. They are cached as JSON under
``$VISPEC_CACHE_DIR`` (default ``$XDG_CACHE_HOME/vispec-export`` or ``~/.cache/vispec-export``)
keyed by the artifacts (manifests, graph files) and the machine (CPU, cores, ONNX Runtime
version, backend, threads): another artifact or another machine measures anew.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from .atomic import apply_umask
from .cache import cache_dir
from .families import Prompt
from .generate import generate_plain
from .speculative import Drafter, generate_speculative
from .target import TargetModel
from .tree import TreeConfig
from .tree_policy import CANDIDATES, CHAINS, AutoTree, PlainDecoding

CALIBRATION_PROMPT = "Write a few sentences about the sea."
CALIBRATION_TOKENS = 4   # per generation: a few rounds, so that passes are short (~1 s)
CALIBRATION_PASSES = 10  # over plain and every tree, after the warm-up pass


def machine_facts(backend: str, threads: int | None) -> dict:
    """What makes costs differ between machines and settings."""
    import onnxruntime

    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return {"machine": platform.machine(), "cpu": cpu, "cores": os.cpu_count(),
            "onnxruntime": onnxruntime.__version__, "backend": backend, "threads": threads}


def artifact_facts(*folders: Path) -> list:
    """Manifests and graph files (size, modification time) of the artifact folders."""
    facts = []
    for folder in folders:
        manifest = (folder / "manifest.json").read_text()
        files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns)
                       for p in folder.iterdir() if p.is_file())
        facts.append([manifest, files])
    return facts


def calibration_key(target: TargetModel, drafter_dir: Path) -> str:
    facts = {"machine": machine_facts(target.backend, target.threads),
             "artifacts": artifact_facts(target.dir, drafter_dir),
             "method": [CALIBRATION_PROMPT, CALIBRATION_TOKENS, CALIBRATION_PASSES],
             "exact": target.exact}  # its steps and its candidates differ
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:24]


def usable_trees(target: TargetModel, drafter: Drafter,
                 candidates: tuple[TreeConfig, ...] | None = None) -> tuple[TreeConfig, ...]:
    """Candidates (default: ``CANDIDATES``, chains for an ``exact`` target) the drafter
    graph is wide enough for and the cache has room for."""
    room = target.max_len // 8
    return tuple(t for t in candidates or (CHAINS if target.exact else CANDIDATES)
                 if t.top_k <= drafter.top_k and max(t.total_tokens, t.drafter_rows) <= room)


def calibration_prompt(target: TargetModel, trees: tuple[TreeConfig, ...]) -> Prompt:
    """The canned prompt, its last tokens only where the export's ``max_len`` leaves no room
    for it, the generation and one round of the largest tree (timing needs no meaning)."""
    prompt = target.prepare(CALIBRATION_PROMPT, [])
    tree_rows = max(max(t.total_tokens, t.drafter_rows) for t in trees)
    room = target.max_len - CALIBRATION_TOKENS - tree_rows
    return Prompt(prompt.input_ids[-room:]) if room < len(prompt.input_ids) else prompt


def measure(target: TargetModel, drafter: Drafter, trees: tuple[TreeConfig, ...],
            progress: Callable[[str], None] | None = None) -> dict:
    """Median milliseconds of one plain step and of one round of each tree: a warm-up pass
    (first runs allocate), then ``CALIBRATION_PASSES`` passes over plain and every tree."""
    prompt = calibration_prompt(target, trees)
    settings = (None, *trees)
    rounds: dict[TreeConfig | None, list] = {tree: [] for tree in settings}
    for i in range(CALIBRATION_PASSES + 1):
        if progress and i % 5 == 0:
            progress(f"measuring plain decoding and {len(trees)} draft trees: pass "
                     f"{i + 1}/{CALIBRATION_PASSES + 1}{' (warm-up)' if i == 0 else ''}")
        shift = i % len(settings)  # each pass starts elsewhere: no setting always follows another
        for tree in settings[shift:] + settings[:shift]:
            run = generate_plain(target, prompt, CALIBRATION_TOKENS) if tree is None else \
                generate_speculative(target, drafter, prompt, CALIBRATION_TOKENS, tree=tree)
            if i:
                rounds[tree] += run.stats.rounds
    return {"plain_ms": _median_ms(rounds[None]),
            "round_ms": {tree: _median_ms(rounds[tree]) for tree in trees}}


def auto_tree(target: TargetModel, drafter: Drafter, drafter_dir: str | os.PathLike,
              progress: Callable[[str], None] | None = None) -> AutoTree | PlainDecoding:
    """An ``AutoTree`` from this machine's cached costs for these artifacts, measured now
    (a few seconds, progress shown) when none are cached; plain decoding when the export's
    ``max_len`` has room for no candidate tree."""
    trees = usable_trees(target, drafter)
    if not trees:
        return PlainDecoding()
    path = cache_dir() / "trees" / f"{calibration_key(target, Path(drafter_dir))}.json"
    costs = _load(path, trees)
    if costs is None:
        if progress:
            progress(f"measuring draft-tree costs on this machine (once; cached in {path})")
        costs = measure(target, drafter, trees, progress)
        _save(path, costs)
    return AutoTree(round_ms=costs["round_ms"], plain_ms=costs["plain_ms"])


def _median_ms(rounds) -> float:
    return float(np.median([r.draft_ms + r.verify_ms + r.host_ms for r in rounds]))


def _load(path: Path, trees: tuple[TreeConfig, ...]) -> dict | None:
    """Cached costs, or None when absent, unreadable or for other candidate trees."""
    try:
        raw = json.loads(path.read_text())
        rounds = {TreeConfig(*t): float(ms) for t, ms in raw["round_ms"]}
        plain = float(raw["plain_ms"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {"plain_ms": plain, "round_ms": rounds} if set(rounds) == set(trees) else None


def _save(path: Path, costs: dict) -> None:
    """Write atomically: a concurrent reader sees the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = {"plain_ms": costs["plain_ms"],
           "round_ms": [[[t.total_tokens, t.depth, t.top_k], ms]
                        for t, ms in costs["round_ms"].items()]}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(raw, f, indent=1)
    apply_umask(tmp)  # mkstemp makes it private
    os.replace(tmp, path)
