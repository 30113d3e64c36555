"""Plain vs speculative decoding on the same backend, per drafter type, measured in one run.

Builds a tiny target and one drafter per type (trained by self-distillation with
``--train-steps > 0``, random otherwise), exports them, and runs ``vispec.runtime.bench``
for each: plain decoding, each fixed tree and ``auto``, interleaved with warm-up and
repeats. Prints decode tokens/s, the ratio to plain, and tokens per target decode pass
(accepted drafts + the bonus token).

    python benchmarks/speculative.py [--family llava] [--train-steps 300] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from vispec.exporter.drafters.export import export_drafter
from vispec.exporter.export import export_target
from vispec.exporter.fixtures.drafters import build_tiny_drafter
from vispec.exporter.fixtures.models import build_tiny_model
from vispec.runtime.bench import format_table, plot, run_bench
from vispec.runtime.pipeline import Pipeline
from vispec.runtime.tree import TreeConfig

PROMPTS = ("What is in the picture?", "Describe the boat on the sea in detail.",
           "Tell me a story about a child and a bird.", "What colour is the sky?")


def make_drafter(kind: str, model_dir: Path, work: Path, steps: int, sequences: int) -> Path:
    """A random drafter, or one trained by self-distillation (reused if ``work`` has it)."""
    if steps <= 0:
        return build_tiny_drafter(kind, model_dir, work / f"{kind}-random")
    from vispec.exporter.drafters.train import TrainConfig, train_drafter
    trained = work / f"{kind}-trained"
    if (trained / "config.json").is_file():
        return trained
    return train_drafter(model_dir, trained, kind=kind,
                         config=TrainConfig(steps=steps, sequences=sequences),
                         progress=lambda m: None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="llava")
    parser.add_argument("--preset", default="tiny", choices=["tiny", "100m"],
                        help="target size (100m: the ~100M-parameter random model)")
    parser.add_argument("--train-steps", type=int, default=1000)
    parser.add_argument("--train-sequences", type=int, default=512,
                        help="target continuations decoded as training data")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--trees", default="8:2:3,16:3:4,30:3:8",
                        help="total:depth:top_k tree settings to try")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--png", action="store_true", help="write bench-KIND.png charts")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="working folder; drafters trained there before are reused")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="vispec-spec-"))
    model_dir = build_tiny_model(args.family, work / "target", preset=args.preset)
    export_target(model_dir, work / "target-onnx", max_len=512, overwrite=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (56, 84, 3), np.uint8))
    prompts = [(text, [image] if i % 2 == 0 else []) for i, text in enumerate(PROMPTS)]
    trees = [TreeConfig(*(int(x) for x in spec.split(":"))) for spec in args.trees.split(",")]
    print(f"{platform.machine()} {platform.processor() or 'cpu'}, {os.cpu_count()} cores; "
          f"target: {args.preset} {args.family}; drafters "
          f"{'trained ' + str(args.train_steps) + ' steps' if args.train_steps > 0 else 'random'}"
          f"; {len(prompts)} prompts x {args.repeats} repeats, {args.max_new_tokens} tokens")
    for kind in ("eagle", "vispec", "hivis"):
        drafter_dir = make_drafter(kind, model_dir, work, args.train_steps, args.train_sequences)
        export_drafter(drafter_dir, model_dir, work / f"{kind}-onnx", max_len=512, top_k=10,
                       overwrite=True)
        pipe = Pipeline(work / "target-onnx", drafter_dir=work / f"{kind}-onnx",
                        threads=args.threads)
        rows = run_bench(pipe, prompts, trees, args.max_new_tokens, args.repeats)
        print(f"\n{kind}\n{format_table(rows)}", flush=True)
        if args.png:
            plot(rows, work / f"bench-{kind}.png", f"{args.preset} {args.family}, {kind}")


if __name__ == "__main__":
    main()
