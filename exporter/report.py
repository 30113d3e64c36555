"""Validation report: parity rows plus the greedy identity check, printed as a table."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from rich.console import Console
from rich.table import Table

from vispec.runtime.generate import generate_plain
from vispec.runtime.ties import Divergence, first_divergence, teacher_forced_logits

from .export import example_images
from .parity import ParityRow
from .reference import hf_greedy
from .validate import PROMPT, Pair, open_pair, parity_rows

TOP_K_CONTAINMENT = 5  # reduced precision: the reference token must stay in the top 5
TEXT_PROMPTS = ("Tell me about a lighthouse.", "What is a volcano?")  # besides PROMPT + image


@dataclass(frozen=True)
class GreedyCheck:
    """Runtime greedy tokens vs ``model.generate(do_sample=False)`` (PyTorch float32) on one
    prompt (``label``).

    fp32 must be token-identical, up to an exact float tie (``runtime.ties``: at the first
    differing token the two tokens' logits lie within the fp32 tie tolerance; reported as a
    tie flip, ``divergence``). Reduced precision (float16, quantized weights) legitimately
    flips near-ties, so it is judged teacher-forced: ``flips`` counts positions where the
    runtime's argmax on the reference prefix differs from the reference token (``agreement``
    is the rest's share), and it passes while every reference token stays in the runtime's
    top ``TOP_K_CONTAINMENT``.
    """

    runtime: list[int]
    reference: list[int]
    precision: str = "float32"
    flips: int = 0
    contained: bool = True
    label: str = ""
    divergence: Divergence | None = None  # where the runtime first left the reference

    @property
    def identical(self) -> bool:
        return self.runtime == self.reference

    @property
    def tie_flip(self) -> bool:
        return self.divergence is not None and self.divergence.is_tie

    @property
    def passed(self) -> bool:
        if self.precision != "float32":
            return self.contained
        return self.identical or self.tie_flip

    @property
    def agreement(self) -> float:
        """Teacher-forced top-1 agreement with the reference tokens."""
        return 1.0 - self.flips / max(len(self.reference), 1)

    @property
    def first_difference(self) -> int | None:
        """Index of the first generated token that differs from the reference (None: none)."""
        if self.identical:
            return None
        pairs = zip(self.runtime, self.reference)
        return next((i for i, (a, b) in enumerate(pairs) if a != b),
                    min(len(self.runtime), len(self.reference)))

    def summary(self) -> str:
        head = f"{self.label}: " if self.label else ""
        if self.precision == "float32":
            verdict = "identical" if self.identical else "DIFFERENT"
            if self.tie_flip:
                d = self.divergence
                verdict = (f"identical up to a tie flip at token {d.position} (logit gap "
                           f"{d.gap:.1e} of the largest <= {d.tolerance:.0e})")
            return (f"{head}greedy tokens vs model.generate: {verdict} "
                    f"({len(self.runtime)} tokens)")
        diverged = self.first_difference
        return (f"{head}{self.precision} vs model.generate (float32): teacher-forced top-1 "
                f"agreement {self.agreement:.2f} ({self.flips} flips in {len(self.reference)} "
                f"tokens), greedy output first differs at token "
                f"{'-' if diverged is None else diverged}, reference always in the top "
                f"{TOP_K_CONTAINMENT}: {'yes' if self.contained else 'NO'}")


def precision_of(facts: dict) -> str:
    """What an artifact is validated as: its quantized weights, else its dtype."""
    weights = facts.get("weights", "float32")
    return weights if weights != "float32" else facts.get("dtype", "float32")


def held_out_prompts() -> list[tuple[str, str, list]]:
    """(label, text, images): the validation prompt with an image, then text prompts."""
    return [("image prompt", PROMPT, example_images()[:1])] + \
        [(f"text prompt {i}", text, []) for i, text in enumerate(TEXT_PROMPTS, 1)]


def greedy_check(model_dir: str | os.PathLike, artifact_dir: str | os.PathLike,
                 max_new_tokens: int = 16, backend: str = "ort") -> GreedyCheck:
    """Runtime greedy decoding of ``artifact_dir`` vs ``model.generate`` of ``model_dir`` on
    the image prompt."""
    label, text, images = held_out_prompts()[0]
    return greedy_of(open_pair(model_dir, artifact_dir, backend), max_new_tokens, text,
                     images, label)


def greedy_of(pair: Pair, max_new_tokens: int = 16, text: str = PROMPT,
              images: list | None = None, label: str = "") -> GreedyCheck:
    """:func:`greedy_check` on an opened pair and one prompt (default: PROMPT, one image)."""
    target = pair.target
    prompt = target.prepare(text, example_images()[:1] if images is None else images)
    runtime = generate_plain(target, prompt, max_new_tokens).tokens
    reference = hf_greedy(pair.adapter, prompt, max_new_tokens)
    logits = teacher_forced_logits(target, prompt, reference)
    ranks = (logits > logits[np.arange(len(reference)), reference][:, None]).sum(-1)
    precision = precision_of(target.facts)
    tie = first_divergence(target, prompt, reference, runtime) if precision == "float32" else None
    return GreedyCheck(runtime, reference, precision, flips=int((ranks > 0).sum()),
                       contained=bool((ranks < TOP_K_CONTAINMENT).all()), label=label,
                       divergence=tie)


def validate_all(model_dir, artifact_dir, *, seed: int = 0, max_new_tokens: int = 16,
                 progress: Callable[[str], None] = lambda m: None):
    """Parity rows of every graph and the greedy check on each held-out prompt."""
    pair = open_pair(model_dir, artifact_dir)
    rows = parity_rows(pair, seed, progress)
    progress("greedy decoding vs model.generate on the held-out prompts")
    return rows, [greedy_of(pair, max_new_tokens, text, images, label)
                  for label, text, images in held_out_prompts()]


def print_parity(rows: list[ParityRow], greedy: Sequence[GreedyCheck] | None = None,
                 console: Console | None = None) -> bool:
    """Print the table; True when every row (and every greedy check) passed.

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
    for check in greedy or ():
        console.print(check.summary())
        ok = ok and check.passed
    return ok
