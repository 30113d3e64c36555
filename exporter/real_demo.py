"""The demo on the real-LM target (SmolLM2-135M-Instruct LLaVA): export fp32, validate
against PyTorch, self-distil ViSpec / HiViS / EAGLE (cached), then generate on held-out
images and text prompts, plainly and speculatively with each drafter."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from vispec.runtime.bench import BenchRow
from vispec.runtime.errors import VispecError
from vispec.runtime.pipeline import Pipeline
from vispec.runtime.tree import TreeConfig

from .drafters.export import export_drafter, validate_drafter
from .export import export_target
from .real_drafters import KINDS, DistillConfig, held_out_text_prompts, real_drafters
from .real_target import cached_target
from .report import print_parity, validate_all
from .synthetic_images import QUESTION, examples, score

Progress = Callable[[str], None]
DEMO_TREE = "auto"  # what a user gets: fitted to this machine's measured costs (cached)
DRAFT_VOCAB = 4096  # head rows the drafters keep (of 49,216; from their training counts)
DRAFT_WEIGHTS = "int8"  # drafting ~1.5x cheaper on a CPU, proposals as good (RESULTS.md)
MAX_LEN = 512
CHART = "speedup.png"  # in the demo's output folder, beside results.json


def demo_prompts(images: int = 8, seed: int = 0) -> list[tuple[str, list, object]]:
    """(text, images, scene or None): held-out synthetic images, then text prompts."""
    out = [(QUESTION, [e.image], e.scene) for e in examples(images, seed, "heldout")]
    return out + [(q, [], None) for q in held_out_text_prompts()]


def run_real_demo(out: Path, *, max_new_tokens: int = 48, tree: TreeConfig | str = DEMO_TREE,
                  config: DistillConfig = DistillConfig(), export=export_target,
                  progress: Progress = print) -> bool:
    """Everything into ``out`` (an empty folder); True when every check passed. ``export``:
    the target exporter (``export.export_target``; ``demo`` passes its own name for it)."""
    console = Console(width=110)
    model_dir = cached_target(progress)
    target_onnx = out / "target-onnx"
    export(model_dir, target_onnx, max_len=MAX_LEN, progress=progress)
    rows, greedy = validate_all(model_dir, target_onnx, progress=progress)
    ok = print_parity(rows, greedy, console)

    checkpoints = real_drafters(model_dir, target_onnx, KINDS, config, progress)
    for kind, ckpt in checkpoints.items():
        export_drafter(ckpt, model_dir, out / f"{kind}-onnx", max_len=MAX_LEN,
                       draft_vocab=DRAFT_VOCAB, weights=DRAFT_WEIGHTS, progress=progress)
        ok = print_parity(validate_drafter(ckpt, model_dir, out / f"{kind}-onnx"), None,
                          console) and ok

    results = measure(target_onnx, {k: out / f"{k}-onnx" for k in KINDS}, demo_prompts(),
                      max_new_tokens, tree, console, progress)
    ok = all(r.identical for rows in results.values() for r in rows) and ok
    print_speed(results, console)
    plot_speedups(results, out / CHART)
    (out / "results.json").write_text(json.dumps(
        {group: [r.to_dict() for r in rows] for group, rows in results.items()}, indent=1))
    return ok


def measure(target_onnx: Path, drafters: dict[str, Path], prompts, max_new_tokens: int,
            tree: TreeConfig | str, console: Console,
            progress: Progress) -> dict[str, list[BenchRow]]:
    """Per prompt group ("image", "text"): a plain row and one row per drafter kind."""
    fixed = tree if isinstance(tree, TreeConfig) else None
    results = {group: [BenchRow("plain", None)] + [BenchRow(k, fixed) for k in drafters]
               for group in ("image", "text")}
    plain_pipe = Pipeline(target_onnx, tree=None)
    pipes = {k: Pipeline(target_onnx, drafter_dir=d, tree=tree, progress=progress)
             for k, d in drafters.items()}
    correct = []
    for text, images, scene in prompts:
        group = "image" if images else "text"
        plain = plain_pipe.generate(text, images, max_new_tokens, draft=False)
        results[group][0].add(plain)
        if scene is not None:
            correct.append(all(score(plain.text, scene).values()))
        print_answer(console, f"image: {scene.answer()}" if scene is not None else text,
                     plain.text)
        for row, (kind, pipe) in zip(results[group][1:], pipes.items()):
            spec = pipe.generate(text, images, max_new_tokens, draft=True)
            row.add(spec)
            row.identical &= spec.tokens == plain.tokens
        progress(f"generated for {text[:40]!r} ({group})")
    if correct:
        console.print(f"target named every attribute right on {sum(correct)}/{len(correct)} "
                      f"held-out images")
    return results


def print_answer(console: Console, label: str, reply: str) -> None:
    """``[label] -> 'reply'`` as written (rich would take ``[...]`` for markup and drop it)."""
    console.print(escape(f"[{label}] -> {reply!r}"))


def print_speed(results: dict[str, list[BenchRow]], console: Console) -> None:
    table = Table(title="Plain vs speculative decoding (greedy, ONNX Runtime CPU, tree "
                        f"{DEMO_TREE}, draft vocabulary {DRAFT_VOCAB}, {DRAFT_WEIGHTS} drafter "
                        f"weights)")
    for col in ("prompts", "decoding", "tokens/pass", "decode tok/s", "speedup",
                "identical to plain"):
        table.add_column(col, justify="right" if col not in ("prompts", "decoding") else "left")
    for group, rows in results.items():
        base = rows[0].tokens_per_second
        for r in rows:
            speedup = r.tokens_per_second / base if base else 0.0
            table.add_row(group, r.setting, f"{r.tokens_per_pass:.2f}",
                          f"{r.tokens_per_second:.1f}", f"{speedup:.2f}x", str(r.identical))
    console.print(table)


def plot_speedups(results: dict[str, list[BenchRow]], path: Path) -> Path:
    """Bar chart PNG: speedup over plain and tokens per pass per drafter kind and group."""
    try:
        import matplotlib
    except ImportError:
        raise VispecError("the demo chart needs matplotlib. Hint: pip install "
                          "'vispec-export[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed, per_pass) = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.8 / len(results)
    for i, (group, rows) in enumerate(results.items()):
        base, spec = rows[0].tokens_per_second, rows[1:]
        xs = [j + i * width for j in range(len(spec))]
        speed.bar(xs, [r.tokens_per_second / base if base else 0 for r in spec], width,
                  label=f"{group} prompts")
        per_pass.bar(xs, [r.tokens_per_pass for r in spec], width, label=f"{group} prompts")
    for ax, label in ((speed, "decode speedup over plain"), (per_pass, "tokens per target pass")):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(KINDS))], list(KINDS))
        ax.axhline(1.0, color="grey", ls="--")
        ax.set_ylabel(label)
        ax.legend(loc="lower center", fontsize="small")
    fig.suptitle("SmolLM2-135M LLaVA target, ONNX Runtime CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
