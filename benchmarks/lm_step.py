"""What tree verification costs: LM-step time for S = 1, 8, 32 new tokens at a fixed past.

Builds the ~100M-parameter random LLaVA ("100m" preset), exports it, and times the ONNX
Runtime LM step on this machine. Prints ratios to S=1 measured in the same run.

    python benchmarks/lm_step.py [--past 512] [--repeats 20] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from vispec.exporter.export import export_target
from vispec.exporter.tiny_models import build_tiny_model
from vispec.runtime.masks import causal_mask, tree_mask
from vispec.runtime.target import TargetModel


def time_step(target: TargetModel, past: int, new: int, repeats: int) -> float:
    """Median seconds of one LM step of ``new`` tokens after ``past`` cached rows."""
    cache = target.new_cache()
    cache.commit(past)  # contents do not change the cost
    rng = np.random.default_rng(0)
    embeds = rng.standard_normal((new, target.facts["hidden_size"])).astype(np.float32)
    positions = target.glue.step_position_ids(past, np.arange(new))
    mask = causal_mask(past, new) if new == 1 else tree_mask(past, np.tri(new, dtype=bool))
    target.step(cache, embeds, positions, mask)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        target.step(cache, embeds, positions, mask)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


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
    print(f"machine: {platform.processor() or platform.machine()}, backend {args.backend}, "
          f"past={args.past}")
    base = None
    print("| new tokens S | step ms | x S=1 |\n|---|---|---|")
    for s in (int(x) for x in args.sizes.split(",")):
        t = time_step(target, args.past, s, args.repeats)
        base = base or t
        print(f"| {s} | {t * 1e3:.2f} | {t / base:.2f} |")


if __name__ == "__main__":
    main()
