"""Plain vs speculative decoding on the real-LM target (SmolLM2-135M-Instruct LLaVA), one run.

The target and the self-distilled drafters come from the demo's cache (built or trained on
first use); each drafter is exported with the full head and/or a draft vocabulary (its
training token counts), then ``vispec.runtime.bench`` runs plain decoding, fixed trees and
``auto`` interleaved, on held-out synthetic images and on text prompts separately: tokens
per pass, decode tok/s, the ratio, and the pass's cost split (drafter / target / host).

    python benchmarks/real_model.py [--kinds vispec,hivis,eagle] [--draft-vocab 4096,full]
                                    [--weights float32,int8]
                                    [--trees 4:2:2] [--margins 0.05] [--lookups 0]
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
from pathlib import Path

from vispec.exporter.demo.real_demo import (
    ATTENTION,
    DRAFT_VOCAB,
    DRAFT_WEIGHTS,
    GROUPS,
    MAX_LEN,
    demo_prompts,
    prompt_group,
)
from vispec.exporter.demo.real_drafters import demo_drafters
from vispec.exporter.demo.real_target import cached_target
from vispec.exporter.drafters.export import export_drafter
from vispec.exporter.export import export_target
from vispec.runtime.bench import format_table, run_bench
from vispec.runtime.pipeline import Pipeline
from vispec.runtime.tree import TreeConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default="vispec,hivis,eagle")
    parser.add_argument("--draft-vocab", default=str(DRAFT_VOCAB), help="sizes, 'full' for the whole head")
    parser.add_argument("--weights", default=DRAFT_WEIGHTS, help="drafter weights, e.g. float32,int8")
    parser.add_argument("--trees", default="4:2:2,8:2:3,16:3:4")
    parser.add_argument("--images", type=int, default=4, help="held-out image prompts")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--margins", default="", help="auto again with these margins, e.g. 0.05")
    parser.add_argument("--lookups", default="", help="auto again with these lookup lengths "
                                                      "(0: off), e.g. 0")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="vispec-real-"))
    say = lambda msg: print(msg, flush=True)  # noqa: E731
    model_dir = cached_target(say)
    target_onnx = work / "target-onnx"
    if not (target_onnx / "manifest.json").exists():
        export_target(model_dir, target_onnx, max_len=MAX_LEN, attention=ATTENTION, progress=say)
    kinds = tuple(args.kinds.split(","))
    checkpoints = demo_drafters(model_dir, kinds, progress=say)
    trees = [TreeConfig(*(int(x) for x in t.split(":"))) for t in args.trees.split(",")]
    prompts = demo_prompts(images=args.images)
    groups = {g: [(t, i) for t, i, s in prompts if prompt_group(t, i) == g] for g in GROUPS}
    groups = {g: items for g, items in groups.items() if items}  # --images 0: text only
    print(f"{platform.machine()} {platform.processor() or 'cpu'}, {os.cpu_count()} cores; "
          f"SmolLM2-135M LLaVA target (fp32, ORT CPU); {args.repeats} repeats, "
          f"{args.max_new_tokens} new tokens at most; prompts: "
          f"{', '.join(f'{len(items)} {g}' for g, items in groups.items())}", flush=True)
    for kind in kinds:
        for size, weights in ((v, w) for w in args.weights.split(",")
                              for v in args.draft_vocab.split(",")):
            vocab = None if size == "full" else int(size)
            out = work / f"{kind}-{size}-{weights}"
            if not (out / "manifest.json").exists():
                export_drafter(checkpoints[kind], model_dir, out, max_len=MAX_LEN,
                               draft_vocab=vocab, weights=weights, progress=say)
            pipe = Pipeline(target_onnx, drafter_dir=out, progress=say)
            for group, items in groups.items():
                rows = run_bench(pipe, items, trees, args.max_new_tokens, args.repeats,
                                 margins=[float(m) for m in args.margins.split(",") if m],
                                 lookups=[int(n) for n in args.lookups.split(",") if n])
                rate = {r.setting: r.tokens_per_second for r in rows}
                best = max(r.tokens_per_second for r in rows if r.tree is not None)
                print(f"\n{kind}, draft vocab {size}, {weights} weights, {group} prompts\n"
                      f"{format_table(rows)}\n"
                      f"auto / best fixed tree: {rate['auto'] / best:.2f}, "
                      f"auto / plain: {rate['auto'] / rate['plain']:.2f}", flush=True)


if __name__ == "__main__":
    main()
