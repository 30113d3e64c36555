"""What a draft vocabulary saves: drafter call cost and acceptance per head size, one run.

For each draft-vocabulary size N (and the full head) the drafter is exported, its step
graph is timed alone (one row, and one tree level of K rows, over a past of 64 rows), and
plain vs speculative decoding run through the same runtime (fixed tree, interleaved by
``vispec.runtime.bench``): tokens per target pass and decode tok/s. Token frequencies come
from ``--corpus``, else the drafter's ``token_counts.json`` (from training), else the
prompts' own text.

    python benchmarks/draft_vocab.py                      # random 100M LLaVA, 49,152 tokens
    python benchmarks/draft_vocab.py --model M --drafter D --corpus replies.txt
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from vispec.exporter.drafters.checkpoint import build_tiny_drafter
from vispec.exporter.drafters.draft_vocab import COUNTS_FILE
from vispec.exporter.drafters.export import export_drafter
from vispec.exporter.export import export_target
from vispec.exporter.onnx_io import example_feeds
from vispec.exporter.tiny_models import build_tiny_model
from vispec.runtime.bench import run_bench
from vispec.runtime.pipeline import Pipeline
from vispec.runtime.specs import INPUT_IDS, NEW, PAST
from vispec.runtime.tree import TreeConfig

PROMPTS = ("Tell me a short story about a child and a bird.", "What colour is the sky?",
           "Describe a boat on a calm sea.", "Write two sentences about a red kite.")


def step_ms(pipe: Pipeline, rows: int, calls: int = 200) -> float:
    """Median ms of one drafter draft-graph call over ``rows`` new rows after 64 past rows."""
    runner = pipe.drafter.draft_runner
    rng = np.random.default_rng(0)
    ids = rng.integers(0, pipe.target.facts["vocab_size"], (1, rows), dtype=np.int64)
    feeds = example_feeds(runner.spec, {NEW: rows, PAST: 64}, rng, **{INPUT_IDS: ids})
    times = []
    for _ in range(calls + 10):
        t0 = time.perf_counter()
        runner.infer(feeds)
        times.append(time.perf_counter() - t0)
    return float(np.median(times[10:])) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="target HF folder")
    parser.add_argument("--drafter", type=Path, default=None, help="drafter checkpoint")
    parser.add_argument("--corpus", type=Path, default=None)
    parser.add_argument("--sizes", default="16384,8192,4096")
    parser.add_argument("--tree", default="16:3:4")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="vispec-dv-"))
    model = args.model or build_tiny_model("llava", work / "target", preset="100m",
                                           text={"vocab_size": 49152})
    drafter = args.drafter or build_tiny_drafter("eagle", model, work / "drafter")
    corpus = args.corpus
    if corpus is None and not (Path(drafter) / COUNTS_FILE).is_file():
        corpus = work / "corpus.txt"
        corpus.write_text("\n".join(PROMPTS * 4))
    export_target(model, work / "target-onnx", max_len=512, overwrite=True)
    tree = TreeConfig(*(int(x) for x in args.tree.split(":")))
    print(f"{platform.machine()} {platform.processor() or 'cpu'}, {os.cpu_count()} cores; "
          f"target {model}; drafter {drafter}; tree {args.tree}; {len(PROMPTS)} prompts x "
          f"{args.repeats} repeats, {args.max_new_tokens} tokens")
    print("| draft vocab | step ms (1 row) | step ms (K rows) | x full head | tokens/pass "
          "| spec tok/s | x plain | identical |\n|---|---|---|---|---|---|---|---|")
    full = None
    for size in [None] + [int(s) for s in args.sizes.split(",")]:
        out = work / f"drafter-{size or 'full'}"
        export_drafter(drafter, model, out, max_len=512, top_k=10, overwrite=True,
                       draft_vocab=size, vocab_corpus=corpus)
        pipe = Pipeline(work / "target-onnx", drafter_dir=out, tree=tree)
        one, level = step_ms(pipe, 1), step_ms(pipe, tree.top_k)
        full = full or one
        plain, spec, _ = run_bench(pipe, [(p, []) for p in PROMPTS], [tree],
                                   args.max_new_tokens, args.repeats)
        print(f"| {size or 'full'} | {one:.2f} | {level:.2f} | {one / full:.2f} | "
              f"{spec.tokens_per_pass:.2f} | {spec.tokens_per_second:.1f} | "
              f"{spec.tokens_per_second / plain.tokens_per_second:.2f} | {spec.identical} |",
              flush=True)


if __name__ == "__main__":
    main()
