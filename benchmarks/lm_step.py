"""What tree verification costs: LM-step time for S = 1, 8, 32 new tokens at a fixed past.

Builds the ~100M-parameter random LLaVA ("100m" preset), exports it, and times the ONNX
Runtime LM step on this machine next to the same step in PyTorch eager (the exported
module on the HF weights). Prints ratios measured in the same run: S vs S=1, and
PyTorch vs ONNX Runtime.

    python benchmarks/lm_step.py [--past 512] [--repeats 20] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vispec.exporter.export import export_target
from vispec.exporter.fixtures.models import build_tiny_model
from vispec.exporter.lm_step import LMStep
from vispec.exporter.loading import load_target
from vispec.runtime.masks import causal_mask, tree_mask
from vispec.runtime.target import TargetModel


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def step_inputs(target: TargetModel, past: int, new: int):
    rng = np.random.default_rng(0)
    embeds = rng.standard_normal((new, target.facts["hidden_size"])).astype(np.float32)
    positions = target.glue.step_position_ids(past, np.arange(new))
    mask = causal_mask(past, new) if new == 1 else tree_mask(past, np.tri(new, dtype=bool))
    return embeds, positions, mask


def time_ort(target: TargetModel, past: int, new: int, repeats: int) -> float:
    """Median seconds of one ONNX Runtime LM step of ``new`` tokens after ``past`` rows."""
    cache = target.new_cache()
    cache.commit(past)  # contents do not change the cost
    embeds, positions, mask = step_inputs(target, past, new)
    return median_seconds(lambda: target.step(cache, embeds, positions, mask), repeats)


@torch.no_grad()
def time_torch(module: LMStep, target: TargetModel, past: int, new: int, repeats: int) -> float:
    """The same step in PyTorch eager."""
    embeds, positions, mask = step_inputs(target, past, new)
    f = target.facts
    kv = [torch.zeros(1, past, f["kv_heads"], f["head_dim"]) for _ in range(2 * f["num_layers"])]
    args = (torch.from_numpy(embeds)[None], torch.from_numpy(positions), torch.from_numpy(mask))
    return median_seconds(lambda: module(*args, *kv), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--past", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--sizes", default="1,8,16,32,60")
    parser.add_argument("--backend", default="ort")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="vispec-bench-"))
    model_dir = work / "llava-100m"
    artifacts = work / "llava-100m-onnx"
    if not artifacts.exists():
        build_tiny_model("llava", model_dir, preset="100m")
        t0 = time.perf_counter()
        export_target(model_dir, artifacts, max_len=1024, progress=print)
        print(f"export time: {time.perf_counter() - t0:.1f} s")
    target = TargetModel(artifacts, backend=args.backend)
    adapter, _ = load_target(model_dir)
    module = LMStep(adapter.language_model, adapter.lm_head).eval()
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, backend "
          f"{args.backend}, past={args.past}")
    base = None
    print("| new tokens S | ORT step ms | x S=1 | PyTorch eager ms | PyTorch / ORT |\n"
          "|---|---|---|---|---|")
    for s in (int(x) for x in args.sizes.split(",")):
        t = time_ort(target, args.past, s, args.repeats)
        pt = time_torch(module, target, args.past, s, max(3, args.repeats // 4))
        base = base or t
        print(f"| {s} | {t * 1e3:.2f} | {t / base:.2f} | {pt * 1e3:.2f} | {pt / t:.2f} |")


if __name__ == "__main__":
    main()
