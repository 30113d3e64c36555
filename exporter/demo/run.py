"""The end-to-end demo, with every step's outcome printed: by default on the real-LM target
(``real_demo``: SmolLM2 LLaVA, three drafters, speed table and chart); ``tiny=True`` on a
tiny random model built here (export, validate, generate plain and speculative; seconds)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from rich.console import Console
from rich.markup import escape

from vispec.runtime.atomic import atomic_output_dir
from vispec.runtime.pipeline import Pipeline

from ..drafters.export import export_drafter, validate_drafter
from ..drafters.train import TrainConfig, train_drafter
from ..export import export_target
from ..fixtures.models import build_tiny_model
from ..report import print_parity, validate_all

PROMPT = "What is in this picture?"


def run_demo(out_dir: str | Path, *, tiny: bool = False, family: str = "llava",
             drafter_kind: str = "vispec", max_new_tokens: int | None = None,
             train: bool = False, overwrite: bool = False,
             progress: Callable[[str], None] = print) -> bool:
    """The real-LM demo (``real_demo.run_real_demo``; ``train``: short drafters trained
    there instead of the shipped ones), or with ``tiny``: build a tiny
    ``family`` model in ``out_dir``, train a ``drafter_kind`` drafter for it, export and
    validate both, then generate. True when every check passed.

    Everything is written to a temporary folder that replaces ``out_dir`` at the end."""
    with atomic_output_dir(out_dir, overwrite) as tmp:
        if tiny:
            ok = _run(tmp, family, drafter_kind, max_new_tokens or 32, progress)
        else:
            from .real_demo import run_real_demo
            ok = run_real_demo(tmp, max_new_tokens=max_new_tokens or 48, train=train,
                               export=export_target, progress=progress)
    if not tiny:
        from .real_demo import CHART
        progress(f"chart (speedup and tokens per pass per drafter): {Path(out_dir) / CHART}")
    progress(f"demo output in {out_dir}")
    return ok


def _run(out: Path, family: str, drafter_kind: str, max_new_tokens: int,
         progress: Callable[[str], None]) -> bool:
    console = Console(width=110)
    progress(f"building a tiny {family} model")
    model = build_tiny_model(family, out / "model")
    export_target(model, out / "target-onnx", max_len=512, progress=progress)
    rows, greedy = validate_all(model, out / "target-onnx", progress=progress)
    ok = print_parity(rows, greedy, console)

    progress(f"training a {drafter_kind} drafter by self-distillation (a short run)")
    drafter = train_drafter(model, out / "drafter", kind=drafter_kind,
                            config=TrainConfig(steps=300, sequences=128), progress=progress)
    export_drafter(drafter, model, out / "drafter-onnx", max_len=512, progress=progress)
    ok = print_parity(validate_drafter(drafter, model, out / "drafter-onnx"), None, console) and ok

    image = out / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (56, 84, 3), np.uint8)).save(image)
    pipe = Pipeline(out / "target-onnx", drafter_dir=out / "drafter-onnx")
    plain = pipe.generate(PROMPT, [image], max_new_tokens, draft=False)
    spec = pipe.generate(PROMPT, [image], max_new_tokens, draft=True)
    for name, r in (("plain", plain), (f"speculative ({drafter_kind})", spec)):
        s = r.stats
        console.print(f"{name:>24}: {s.new_tokens} tokens, {s.tokens_per_second:8.1f} tok/s, "
                      f"{s.target_passes} target passes, {s.mean_accepted:.2f} tokens/pass "
                      f"(bonus included)")
    same = plain.tokens == spec.tokens
    console.print(f"speculative output identical to plain greedy: {same}")
    console.print(f"generated text (a random model: noise): {escape(repr(spec.text))}")
    console.print("On a tiny model a target step (~0.3 ms) costs less than a draft round, so "
                  "speculation is slower here; benchmarks/RESULTS.md shows where it pays.")
    return ok and same
