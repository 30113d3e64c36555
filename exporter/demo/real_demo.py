"""The demo on the real-LM target (SmolLM2-135M-Instruct LLaVA): export fp32, validate
against PyTorch, take the shipped ViSpec / HiViS / EAGLE drafters (``train``: self-distil
short ones, cached), then time plain and speculative decoding with each drafter on held-out
images and text prompts as ``bench`` does: interleaved, after a warm-up, repeated, medians
over the repeats in which the machine was quiet (contended groups marked)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from vispec.runtime.bench import BenchRow, interleaved
from vispec.runtime.cpu_load import QUIET_CORES
from vispec.runtime.drafter_specs import DRAFT, draft_spec
from vispec.runtime.errors import ManifestError, VispecError
from vispec.runtime.manifest import Manifest
from vispec.runtime.pipeline import Pipeline
from vispec.runtime.specs import GQA
from vispec.runtime.tree import TreeConfig

from ..drafters.export import export_drafter, validate_drafter
from ..export import export_target
from ..report import print_parity, validate_all
from .real_drafters import KINDS, DistillConfig, demo_drafters, held_out_text_prompts
from .real_target import cached_target
from .synthetic_images import DETAIL_QUESTION, QUESTION, examples, score

Progress = Callable[[str], None]
DEMO_TREE = "auto"  # what a user gets: fitted to this machine's measured costs (cached)
DRAFT_VOCAB = 4096  # head rows the drafters keep (of 49,216; from their training counts)
DRAFT_WEIGHTS = "int4"  # drafting cheaper on a CPU (int8 ~1.5x), proposals as good (RESULTS.md)
MAX_LEN = 512
ATTENTION = GQA  # the LM graph in ONNX Runtime's fused CPU form (DESIGN.md: LM graph forms)
CHART = "speedup.png"  # in the demo's output folder, beside results.json
REPEATS = 2  # timed passes after the warm-up (each setting, each prompt)
DETAILED = 4  # held-out images also asked DETAIL_QUESTION
GROUPS = ("image", "detailed", "text")  # the demo's prompt groups, timed apart


def export_demo_drafter(checkpoint: Path, model_dir: Path, work: Path,
                        progress: Progress = print) -> Path:
    """``checkpoint`` exported as the demo exports it (``DRAFT_VOCAB``, ``DRAFT_WEIGHTS``)
    into ``work``, in a folder keyed by its weights' hash and precision: reused while they
    are the same and its draft graph has this version's inputs and outputs (benchmarks on
    the demo target)."""
    from .real_drafters import file_hash

    weights = file_hash(checkpoint / "model.safetensors")
    out = work / f"{checkpoint.name}-onnx-{DRAFT_WEIGHTS}-{weights}"
    if not current_draft_graph(out):
        export_drafter(checkpoint, model_dir, out, max_len=MAX_LEN, draft_vocab=DRAFT_VOCAB,
                       weights=DRAFT_WEIGHTS, overwrite=out.exists(), progress=progress)
    return out


def current_draft_graph(folder: Path) -> bool:
    """``folder`` holds a drafter export whose draft graph has the IO this version writes."""
    try:
        manifest = Manifest.load(folder, kind="drafter")
    except ManifestError:
        return False
    f = manifest.model
    return manifest.graph(DRAFT).spec == draft_spec(
        manifest.family, hidden_size=f["hidden_size"], kv_heads=f["kv_heads"],
        head_dim=f["head_dim"], top_k=f["top_k"], max_len=manifest.max_len)


def demo_prompts(images: int = 8, seed: int = 0) -> list[tuple[str, list, object]]:
    """(text, images, scene or None): held-out synthetic images (the first ``DETAILED``
    also asked for a detailed description), then text prompts."""
    held_out = examples(images, seed, "heldout")
    out = [(QUESTION, [e.image], e.scene) for e in held_out]
    out += [(DETAIL_QUESTION, [e.image], e.scene) for e in held_out[:DETAILED]]
    return out + [(q, [], None) for q in held_out_text_prompts()]


def run_real_demo(out: Path, *, max_new_tokens: int = 48, tree: TreeConfig | str = DEMO_TREE,
                  train: bool = False, config: DistillConfig = DistillConfig(),
                  repeats: int = REPEATS, export=export_target, progress: Progress = print) -> bool:
    """Everything into ``out`` (an empty folder); True when every check passed. ``train``:
    the short in-demo drafter training instead of the shipped drafters. ``export``: the
    target exporter (``export.export_target``; ``demo`` passes its own name for it)."""
    console = Console(width=110)
    model_dir = cached_target(progress)
    target_onnx = out / "target-onnx"
    export(model_dir, target_onnx, max_len=MAX_LEN, attention=ATTENTION, progress=progress)
    rows, greedy = validate_all(model_dir, target_onnx, progress=progress)
    ok = print_parity(rows, greedy, console)

    checkpoints = demo_drafters(model_dir, KINDS, train=train, config=config, progress=progress)
    for kind, ckpt in checkpoints.items():
        export_drafter(ckpt, model_dir, out / f"{kind}-onnx", max_len=MAX_LEN,
                       draft_vocab=DRAFT_VOCAB, weights=DRAFT_WEIGHTS, progress=progress)
        ok = print_parity(validate_drafter(ckpt, model_dir, out / f"{kind}-onnx"), None,
                          console) and ok

    results = measure(target_onnx, {k: out / f"{k}-onnx" for k in KINDS}, demo_prompts(),
                      max_new_tokens, tree, console, progress, repeats)
    ok = all(r.identical for rows in results.values() for r in rows) and ok
    print_speed(results, console)
    plot_speedups(results, out / CHART)
    (out / "results.json").write_text(json.dumps(
        {group: [{**r.to_dict(), "speedup": round(r.speedup(rows[0]), 4)} for r in rows]
         for group, rows in results.items()}, indent=1))
    return ok


def measure(target_onnx: Path, drafters: dict[str, Path], prompts, max_new_tokens: int,
            tree: TreeConfig | str, console: Console, progress: Progress,
            repeats: int = REPEATS) -> dict[str, list[BenchRow]]:
    """Per prompt group (``GROUPS``: short image answers, detailed descriptions, text): a
    plain row and one row per drafter kind, timed by ``bench.interleaved`` (warm-up,
    ``repeats`` rotating passes, contention sampled)."""
    fixed = None if tree == DEMO_TREE else tree
    plain_pipe = Pipeline(target_onnx, tree=None)
    pipes = {k: Pipeline(target_onnx, drafter_dir=d, tree=tree, progress=progress)
             for k, d in drafters.items()}
    for pipe in pipes.values():
        pipe.tree_policy()  # `auto` measures its costs before any timing (cached afterwards)
    replies: dict[str, str] = {}  # prompt -> plain reply (its first, the reference)

    def plain(text, images):
        result = plain_pipe.generate(text, images, max_new_tokens, draft=False)
        replies.setdefault(_key(text, images), result.text)
        return result

    results = {}
    for group in GROUPS:
        items = [(text, images) for text, images, _ in prompts if prompt_group(text, images) == group]
        if not items:
            continue
        settings = [(BenchRow("plain", None), plain)]
        settings += [(BenchRow(kind, fixed), lambda text, images, pipe=pipe: pipe.generate(
            text, images, max_new_tokens, draft=True)) for kind, pipe in pipes.items()]
        progress(f"timing {group} prompts: plain and {', '.join(pipes)}, {repeats} repeats "
                 f"after a warm-up")
        results[group] = interleaved(settings, items, repeats, progress)
    correct = []
    for text, images, scene in prompts:
        reply = replies[_key(text, images)]
        if scene is not None:
            correct.append(all(score(reply, scene).values()))
        detail = ", detailed" if text == DETAIL_QUESTION else ""
        print_answer(console, f"image{detail}: {scene.answer()}" if scene is not None else text,
                     reply)
    if correct:
        console.print(f"target named every attribute right on {sum(correct)}/{len(correct)} "
                      f"held-out image prompts")
    return results


def prompt_group(text: str, images: list) -> str:
    """The ``GROUPS`` entry of a prompt."""
    return "text" if not images else "detailed" if text == DETAIL_QUESTION else "image"


def _key(text: str, images: list) -> str:
    return f"{text}|{','.join(str(id(i)) for i in images)}"


def print_answer(console: Console, label: str, reply: str) -> None:
    """``[label] -> 'reply'`` as written (rich would take ``[...]`` for markup and drop it)."""
    console.print(escape(f"[{label}] -> {reply!r}"))


def print_speed(results: dict[str, list[BenchRow]], console: Console) -> None:
    table = Table(title=f"Plain vs speculative decoding (greedy, ONNX Runtime CPU, {ATTENTION} "
                        f"LM graph, tree "
                        f"{DEMO_TREE}, draft vocabulary {DRAFT_VOCAB}, {DRAFT_WEIGHTS} drafter "
                        f"weights; medians over quiet repeats)")
    for col in ("prompts", "decoding", "tokens/pass", "decode tok/s", "speedup",
                "identical to plain", "quiet repeats"):
        table.add_column(col, justify="right" if col not in ("prompts", "decoding") else "left")
    for group, rows in results.items():
        base = rows[0]
        marker = f"{len(base.quiet()) if not base.contended() else 0}/{len(base.repeats)}"
        marker += " contended" if base.contended() else ""
        for r in rows:
            table.add_row(group, r.setting, f"{r.tokens_per_pass:.2f}",
                          f"{r.median_tokens_per_second():.1f}", f"{r.speedup(base):.2f}x",
                          str(r.identical), marker)
    console.print(table)
    for group, rows in results.items():
        if rows[0].contended():
            console.print(f"{group} prompts contended: other processes used "
                          f"{min(rows[0].others):.2f}-{max(rows[0].others):.2f} cores (more than "
                          f"{QUIET_CORES}) in every repeat; their speedups are not a quiet "
                          f"machine's.")


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
        spec = rows[1:]
        xs = [j + i * width for j in range(len(spec))]
        speed.bar(xs, [r.speedup(rows[0]) for r in spec], width, label=f"{group} prompts")
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
