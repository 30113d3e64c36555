"""What a draft vocabulary saves: drafter call cost (and its split) and acceptance per head size.

For each draft-vocabulary size N (and the full head) and each weight precision (float32, and
int8 from ``export-drafter --weights int8``) the drafter is exported; the draft graphs of every
size and the draft graph cut after the decoder layer (embedding, fusion and layer: what every
size shares; one per precision) are timed in turn, one call of each after the other (so every call
finds its weights evicted by another graph, as a drafter call after the target's pass does,
and a burst of load hits all alike), for one row and for one tree level of K rows over a past
of 64 rows. The head part of a call (head MatMul, log-softmax, top-k, d2t Gather) is the call
minus the layer part; the weights a call reads (all but the gathered embedding rows) bound its
cost from below on a CPU whose bandwidth it saturates. Then plain vs speculative decoding
run through the same runtime (fixed tree, interleaved by ``vispec.runtime.bench``): tokens
per target pass and decode tok/s.
Token frequencies come from ``--corpus``, else the drafter's ``token_counts.json`` (from
training), else the prompts' own text.

    python benchmarks/draft_vocab.py                      # random 100M LLaVA, 49,152 tokens
    python benchmarks/draft_vocab.py --model M --drafter D --corpus replies.txt --weights int8
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from vispec.exporter.drafters.draft_vocab import COUNTS_FILE
from vispec.exporter.drafters.export import export_drafter
from vispec.exporter.export import export_target
from vispec.exporter.fixtures.drafters import build_tiny_drafter
from vispec.exporter.fixtures.models import build_tiny_model
from vispec.exporter.onnx_io import example_feeds
from vispec.runtime.backends import make_runner
from vispec.runtime.bench import run_bench
from vispec.runtime.drafter_specs import DRAFT, RESIDUAL_INDEX
from vispec.runtime.manifest import Manifest
from vispec.runtime.pipeline import Pipeline
from vispec.runtime.specs import INPUT_IDS, NEW, PAST, TOPK_IDS, TOPK_LOGPROBS
from vispec.runtime.tree import TreeConfig

PROMPTS = ("Tell me a short story about a child and a bird.", "What colour is the sky?",
           "Describe a boat on a calm sea.", "Write two sentences about a red kite.")
LAYER = "layer"  # the draft graph without its head: outputs hidden states and K/V


def draft_runners(artifacts: dict[str, Path], work: Path) -> dict:
    """Runners of each artifact's draft graph and, per weight precision, of the graph cut
    after the decoder layer (``LAYER`` + ``label("", weights)``)."""
    runners, layers = {}, {}
    for name, folder in artifacts.items():
        entry = Manifest.load(folder).graph(DRAFT)
        runners[name] = make_runner("ort", folder / entry.file, entry.spec)
        layers.setdefault(LAYER + label("", Manifest.load(folder).model["weights"]),
                          (folder, entry))
    for name, (folder, entry) in layers.items():
        spec = dataclasses.replace(entry.spec, outputs=tuple(
            t for t in entry.spec.outputs if t.name not in (TOPK_LOGPROBS, TOPK_IDS)))
        path = work / f"draft-{name.replace(' ', '-')}.onnx"
        onnx.utils.extract_model(str(folder / entry.file), str(path), spec.input_names,
                                 spec.output_names)
        runners[name] = make_runner("ort", path, spec)
    return runners


def label(size: str, weights: str) -> str:
    """A row's name: the size, then the precision unless float32 ("8192", "8192 int8")."""
    return size if weights == "float32" else f"{size} {weights}"


def weight_mb(path: Path) -> float:
    """MB of weights one call reads: every initializer but the tables rows are gathered from
    (the embedding, d2t)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    gathered = {n.input[0] for n in graph.node if n.op_type == "Gather"}
    return sum(int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
               for t in graph.initializer if t.name not in gathered) / 1e6


def call_ms(runners: dict, rows: int, vocab: int, calls: int = 200) -> dict[str, float]:
    """Median ms of one call of each runner over ``rows`` new rows after 64 past rows, the
    runners called in turn."""
    rng = np.random.default_rng(0)
    spec = next(r.spec for name, r in runners.items() if name.startswith(LAYER))
    fixed = {INPUT_IDS: rng.integers(0, vocab, (1, rows), dtype=np.int64)}
    if RESIDUAL_INDEX in spec.input_names:
        fixed[RESIDUAL_INDEX] = np.zeros(1, np.int64)
    feeds = example_feeds(spec, {NEW: rows, PAST: 64}, rng, **fixed)
    times = {name: [] for name in runners}
    for i in range(calls + 10):  # 10 warm-up rounds
        for name, runner in runners.items():
            t0 = time.perf_counter()
            runner.infer(feeds)
            if i >= 10:
                times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) * 1e3 for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="target HF folder")
    parser.add_argument("--drafter", type=Path, default=None, help="drafter checkpoint")
    parser.add_argument("--corpus", type=Path, default=None)
    parser.add_argument("--sizes", default="16384,8192,4096")
    parser.add_argument("--weights", default="float32,int8", help="drafter weight precisions")
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
    variants = [(size, w) for w in args.weights.split(",") for size in ["full"] + args.sizes.split(",")]
    artifacts = {label(*v): work / f"drafter-{v[0]}-{v[1]}" for v in variants}
    for (size, weights), out in zip(variants, artifacts.values()):
        export_drafter(drafter, model, out, max_len=512, top_k=10, overwrite=True,
                       draft_vocab=None if size == "full" else int(size), vocab_corpus=corpus,
                       weights=weights)
    vocab = Manifest.load(out).model["vocab_size"]
    runners = draft_runners(artifacts, work)
    one, level = call_ms(runners, 1, vocab), call_ms(runners, tree.top_k, vocab)
    print(f"{platform.machine()} {platform.processor() or 'cpu'}, {os.cpu_count()} cores; "
          f"target {model}; drafter {drafter}; tree {args.tree}; {len(PROMPTS)} prompts x "
          f"{args.repeats} repeats, {args.max_new_tokens} tokens")
    for name in runners:
        if name.startswith(LAYER):
            print(f"{name} part (embedding, fusion, decoder layer; every size): {one[name]:.2f} ms "
                  f"(1 row), {level[name]:.2f} ms ({tree.top_k} rows)")
    mb = {name: weight_mb(out / Manifest.load(out).graph(DRAFT).file)
          for name, out in artifacts.items()}
    print("| draft vocab | weights MB read | x full (bytes) | call ms (1 row) | head part | "
          "(K rows) | x full head (1 row) | x full float32 (1 row) | tokens/pass | spec tok/s | "
          "x plain | identical |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    fp32_full = one.get(label("full", "float32"))
    for (size, weights), (name, out) in zip(variants, artifacts.items()):
        full, layer = label("full", weights), LAYER + label("", weights)
        pipe = Pipeline(work / "target-onnx", drafter_dir=out)  # `auto`, run_bench's third row
        plain, spec, _ = run_bench(pipe, [(p, []) for p in PROMPTS], [tree],
                                   args.max_new_tokens, args.repeats)
        print(f"| {name} | {mb[name]:.1f} | {mb[name] / mb[full]:.3f} | {one[name]:.2f} | "
              f"{one[name] - one[layer]:.2f} | {level[name]:.2f} | {one[name] / one[full]:.2f} | "
              f"{f'{one[name] / fp32_full:.2f}' if fp32_full else '-'} | "
              f"{spec.tokens_per_pass:.2f} | {spec.tokens_per_second:.1f} | "
              f"{spec.tokens_per_second / plain.tokens_per_second:.2f} | {spec.identical} |",
              flush=True)


if __name__ == "__main__":
    main()
