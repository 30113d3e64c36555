"""Validation report: parity rows plus the greedy identity check, printed as a table."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
from rich.console import Console
from rich.table import Table

from vispec.runtime.generate import generate_plain
from vispec.runtime.masks import causal_mask
from vispec.runtime.target import TargetModel

from .export import example_images
from .parity import ParityRow
from .reference import hf_greedy
from .validate import PROMPT, Pair, open_pair, parity_rows

TOP_K_CONTAINMENT = 5  # reduced precision: the reference token must stay in the top 5


@dataclass(frozen=True)
class GreedyCheck:
    """Runtime greedy tokens vs ``model.generate(do_sample=False)`` on one prompt.

    fp32 must be token-identical. Reduced precision legitimately flips near-ties, so it is
    judged teacher-forced: ``flips`` counts positions where the runtime's argmax on the
    reference prefix differs from the reference token, and it passes while every reference
    token stays in the runtime's top ``TOP_K_CONTAINMENT``.
    """

    runtime: list[int]
    reference: list[int]
    precision: str = "float32"
    flips: int = 0
    contained: bool = True

    @property
    def identical(self) -> bool:
        return self.runtime == self.reference

    @property
    def passed(self) -> bool:
        return self.identical if self.precision == "float32" else self.contained

    def summary(self) -> str:
        if self.precision == "float32":
            return (f"greedy tokens vs model.generate: "
                    f"{'identical' if self.identical else 'DIFFERENT'} ({len(self.runtime)} tokens)")
        return (f"{self.precision} teacher-forced vs model.generate: {self.flips} argmax flips in "
                f"{len(self.reference)} tokens, reference always in the top {TOP_K_CONTAINMENT}: "
                f"{'yes' if self.contained else 'NO'}")


def teacher_forced_logits(target: TargetModel, prompt, tokens: list[int]) -> np.ndarray:
    """Runtime logits ``[n, V]`` predicting each of ``tokens`` given the prompt and the
    tokens before it (one LM pass)."""
    embeds = np.concatenate([target.prompt_embeds(prompt),
                             target.embed(np.asarray(tokens[:-1], np.int64)).astype(np.float32)])
    positions, next_pos = target.glue.position_ids(prompt)
    steps = target.glue.step_position_ids(next_pos, np.arange(len(tokens) - 1))
    positions = np.concatenate([positions, steps], axis=-1)
    cache = target.new_cache()
    out = target.step(cache, embeds, positions, causal_mask(0, len(embeds)))
    return out.logits[len(prompt.input_ids) - 1:]


def greedy_check(model_dir: str | os.PathLike, artifact_dir: str | os.PathLike,
                 max_new_tokens: int = 16, backend: str = "ort") -> GreedyCheck:
    """Runtime greedy decoding of ``artifact_dir`` vs ``model.generate`` of ``model_dir``."""
    return greedy_of(open_pair(model_dir, artifact_dir, backend), max_new_tokens)


def greedy_of(pair: Pair, max_new_tokens: int = 16) -> GreedyCheck:
    """:func:`greedy_check` on an opened pair."""
    target = pair.target
    prompt = target.prepare(PROMPT, example_images()[:1])
    runtime = generate_plain(target, prompt, max_new_tokens).tokens
    reference = hf_greedy(pair.adapter, prompt, max_new_tokens)
    precision = target.facts.get("dtype", "float32")
    logits = teacher_forced_logits(target, prompt, reference).astype(np.float32)
    ranks = (logits > logits[np.arange(len(reference)), reference][:, None]).sum(-1)
    return GreedyCheck(runtime, reference, precision, flips=int((ranks > 0).sum()),
                       contained=bool((ranks < TOP_K_CONTAINMENT).all()))


def validate_all(model_dir, artifact_dir, *, seed: int = 0, max_new_tokens: int = 16,
                 progress: Callable[[str], None] = lambda m: None):
    """Parity rows of every graph and the greedy identity check."""
    pair = open_pair(model_dir, artifact_dir)
    rows = parity_rows(pair, seed, progress)
    progress("greedy identity vs model.generate")
    return rows, greedy_of(pair, max_new_tokens)


def print_parity(rows: list[ParityRow], greedy: GreedyCheck | None = None,
                 console: Console | None = None) -> bool:
    """Print the table; True when every row (and the greedy check) passed.

    Rows measured against PyTorch's own reduced-precision forward show its error, the
    error of exact math on the rounded weights, and the export's error over the larger of
    the two (the bound is a multiple of it)."""
    console = console or Console(width=130)
    baseline = next((r.precision for r in rows if r.baseline is not None), None)
    table = Table(title="parity vs PyTorch float32")
    columns = ["graph", "case", "output", "max abs err", "rel err"]
    if baseline:
        columns += [f"PyTorch {baseline} rel err", f"{baseline} weights floor", "ratio"]
    for col in columns + ["bound", "result"]:
        table.add_column(col)
    for r in rows:
        graph = r.graph if r.precision == "float32" else f"{r.graph} ({r.precision})"
        cells = [graph, r.case, r.output, f"{r.max_abs:.2e}", f"{r.rel:.2e}"]
        if baseline:
            cells += ["-"] * 3 if r.baseline is None else \
                [f"{r.baseline:.2e}", f"{r.weights_floor:.2e}", f"{r.ratio:.2f}"]
        table.add_row(*cells, f"{r.tol:.1e}", "pass" if r.passed else "FAIL")
    console.print(table)
    ok = all(r.passed for r in rows)
    if greedy is not None:
        console.print(greedy.summary())
        ok = ok and greedy.passed
    return ok
