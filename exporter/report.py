"""Validation report: parity rows plus the greedy identity check, printed as a table."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from rich.console import Console
from rich.table import Table

from vispec.runtime.generate import generate_plain
from vispec.runtime.target import TargetModel

from .export import example_images
from .loading import load_target
from .parity import ParityRow
from .reference import hf_greedy
from .validate import PROMPT, validate_target


@dataclass(frozen=True)
class GreedyCheck:
    """Runtime greedy tokens vs ``model.generate(do_sample=False)`` on one prompt."""

    runtime: list[int]
    reference: list[int]

    @property
    def identical(self) -> bool:
        return self.runtime == self.reference


def greedy_check(model_dir: str | os.PathLike, artifact_dir: str | os.PathLike,
                 max_new_tokens: int = 16, backend: str = "ort") -> GreedyCheck:
    target = TargetModel(artifact_dir, backend=backend)
    prompt = target.prepare(PROMPT, example_images()[:1])
    runtime = generate_plain(target, prompt, max_new_tokens).tokens
    adapter, _ = load_target(model_dir)
    return GreedyCheck(runtime, hf_greedy(adapter, prompt, max_new_tokens))


def validate_all(model_dir, artifact_dir, *, seed: int = 0, max_new_tokens: int = 16,
                 progress: Callable[[str], None] = lambda m: None):
    """Parity rows of every graph and the greedy identity check."""
    rows = validate_target(model_dir, artifact_dir, seed=seed, progress=progress)
    progress("greedy identity vs model.generate")
    return rows, greedy_check(model_dir, artifact_dir, max_new_tokens)


def print_parity(rows: list[ParityRow], greedy: GreedyCheck | None = None,
                 console: Console | None = None) -> bool:
    """Print the table; True when every row (and the greedy check) passed."""
    console = console or Console(width=110)
    table = Table(title="parity vs PyTorch")
    for col in ("graph", "case", "output", "max abs err", "rel err", "tolerance", "result"):
        table.add_column(col)
    for r in rows:
        table.add_row(r.graph, r.case, r.output, f"{r.max_abs:.2e}", f"{r.rel:.2e}",
                      f"{r.tol:.0e}", "pass" if r.passed else "FAIL")
    console.print(table)
    ok = all(r.passed for r in rows)
    if greedy is not None:
        console.print(f"greedy tokens vs model.generate: "
                      f"{'identical' if greedy.identical else 'DIFFERENT'} "
                      f"({len(greedy.runtime)} tokens)")
        ok = ok and greedy.identical
    return ok
