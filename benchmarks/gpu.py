"""GPU benchmark at real sizes: what a round costs on the device-resident CUDA path.

For each model shape: a random-weight LLaVA target whose language model has the real
architecture (Vicuna-7B / LLaVA-1.6-7B, TinyLlama-1.1B), built in fp16, exported in fp16,
with an EAGLE drafter of the real drafter shape (one layer, the target's head), then on
ONNX Runtime's CUDA provider with the KV caches and step tensors on the device:

- plain decode step ms at a given past vs the weight-bandwidth floor (weight bytes read
  per step / device bandwidth measured in the same run with a device-to-device copy);
- verify cost of T = 1..64 tree tokens relative to one step;
- drafter call ms, host ms per round and host<->device bytes per round from speculative
  rounds (trees (30, 3, 8) and (60, 5, 10));
- greedy speculative output == plain greedy output;
- the projected speedup at published acceptance lengths:
  tau * step / (verify(T) + drafter calls + host).

Random weights accept ~nothing, so speedups are projected from the measured costs.

    python benchmarks/gpu.py [--models 1b,7b] [--layers-7b 8] [--past 512] [--json FILE]
    python benchmarks/gpu.py --smoke     # tiny shapes on the CPU provider: checks the script
    python benchmarks/gpu.py --probe FILE    # which GPU backends this machine has (exit 2: no GPU)
    python benchmarks/gpu.py --summary DIR   # one table of gpu_check.sh's results in DIR

Needs onnxruntime-gpu and a CPU torch (to build and export the models); the bandwidth copy
uses the runtime's own libcudart binding, so no CUDA torch. One prepared run (build,
export, measure) takes ~5-8 minutes on one H100/H200 with the defaults; ``--layers-7b 32``
measures the whole 7B stack (about 3 minutes more). Stacks are cut to ``--layers-7b`` /
``--layers-1b`` layers: every layer has the real shape, and the floor is computed for the
same bytes, so the step / floor ratio holds.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from vispec.runtime.backends.ort import CUDA, available_providers, ort_memory, shadowed_gpu_wheel
from vispec.runtime.drafters import open_drafter
from vispec.runtime.errors import VispecError
from vispec.runtime.generate import generate_plain
from vispec.runtime.masks import causal_mask, tree_mask
from vispec.runtime.speculative import generate_speculative
from vispec.runtime.target import TargetModel
from vispec.runtime.tree import TreeConfig

SHAPES = {  # language-model text configs (LLaVA's LM is a Llama)
    "7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, head_dim=128, intermediate_size=11008, vocab_size=32000),
    "1b": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, head_dim=64, intermediate_size=5632, vocab_size=32000),
    "smoke": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, intermediate_size=256, vocab_size=4096),
}
TREES = (TreeConfig(30, 3, 8), TreeConfig(60, 5, 10))
VERIFY_SIZES = (1, 2, 4, 8, 16, 30, 64)
TAUS = (2.0, 2.5, 3.0, 3.5)  # tokens per target pass (ViSpec / EAGLE report 2.5-3.5 on 7B VLMs)
PROMPT = "Describe the picture in detail, then tell a long story about it."


def log(msg: str, t0: float = time.perf_counter()) -> None:
    print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3


def bandwidth_gbs(device: str) -> float:
    """Device memory bandwidth (bytes read + written per second) of a 1 GiB copy (256 MiB
    on the CPU), through the runtime's libcudart binding on a GPU."""
    if device == "cuda":
        from vispec.runtime.backends.cuda import cuda_memory

        memory, n = cuda_memory(), 1 << 30
        src, dst = memory.empty((n,), np.uint8), memory.empty((n,), np.uint8)
        ms = median_ms(lambda: memory.copy(dst, src), 10)  # cudaMemcpy2D + synchronize
        memory.close()
    else:
        n = 1 << 28
        src, dst = np.ones(n, np.uint8), np.empty(n, np.uint8)
        ms = median_ms(lambda: np.copyto(dst, src), 5)
    return 2 * n / ms / 1e6


def weight_bytes(text: dict) -> int:
    """Bytes of fp16 weights one decode step reads: every layer, the final norm and the LM
    head (the embedding table is read one row per token)."""
    h, i, layers = text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"]
    q = text["num_attention_heads"] * text["head_dim"]
    kv = text["num_key_value_heads"] * text["head_dim"]
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h
    return 2 * (layers * per_layer + h + h * text["vocab_size"])


def build(name: str, text: dict, work: Path, max_len: int) -> tuple[Path, Path, Path]:
    """Model dir, target artifacts, drafter artifacts of one shape (fp16 target; a CPU torch
    builds and exports them)."""
    import torch

    from vispec.exporter.drafters.export import export_drafter
    from vispec.exporter.export import export_target
    from vispec.exporter.fixtures.drafters import build_tiny_drafter
    from vispec.exporter.fixtures.models import build_tiny_model

    model_dir = build_tiny_model("llava", work / f"{name}-model", text=text, dtype=torch.float16)
    log(f"{name}: built the random fp16 target")
    target = work / f"{name}-target"
    export_target(model_dir, target, max_len=max_len, max_images=1, dtype="float16",
                  progress=lambda m: log(f"{name}: {m}"))
    drafter_dir = build_tiny_drafter("eagle", model_dir, work / f"{name}-eagle")
    drafter = work / f"{name}-drafter"
    export_drafter(drafter_dir, model_dir, drafter, top_k=10, max_len=max_len,
                   progress=lambda m: log(f"{name}: {m}"))
    return model_dir, target, drafter


def measure(name: str, text: dict, artifacts: Path, drafter_dir: Path, backend: str,
            past: int, repeats: int, bandwidth: float) -> dict:
    # --smoke runs the device-resident code on ORT CPU OrtValues (traffic counted as on CUDA)
    target = TargetModel(artifacts, backend=backend,
                         memory=ort_memory("cpu") if backend == "ort" else None)
    drafter = open_drafter(drafter_dir, target, backend=backend)
    cache = target.new_cache()
    cache.commit(past)  # contents do not change the cost
    position = past
    ids = np.arange(3, 3 + max(VERIFY_SIZES)) % 400

    def step(n: int):
        mask = causal_mask(past, 1) if n == 1 else tree_mask(past, np.tri(n, dtype=bool))
        positions = target.glue.step_position_ids(position, np.arange(n))
        return lambda: target.step_tokens(cache, ids[:n], positions, mask).argmax()

    verify = {n: median_ms(step(n), repeats) for n in VERIFY_SIZES}
    floor = weight_bytes(text) / (bandwidth * 1e6)
    log(f"{name}: step {verify[1]:.2f} ms at past {past} (floor {floor:.2f} ms)")
    prompt = target.prepare(PROMPT)
    plain = generate_plain(target, prompt, 48)
    rounds = {}
    for tree in TREES:
        before = target.traffic.snapshot()
        spec = generate_speculative(target, drafter, prompt, 48, tree=tree)
        moved = target.traffic.since(before)
        r = spec.stats.rounds
        draft_ms = float(np.mean([x.draft_ms for x in r]))
        host_ms = float(np.mean([x.host_ms for x in r]))
        verify_ms = float(np.mean([x.verify_ms for x in r]))
        round_ms = draft_ms + verify_ms + host_ms
        rounds[str(tree.total_tokens)] = {
            "tree": [tree.total_tokens, tree.depth, tree.top_k],
            "identical_to_plain": spec.tokens == plain.tokens,
            "drafter_call_ms": draft_ms / tree.depth, "verify_ms": verify_ms,
            "host_ms": host_ms, "host_share": host_ms / round_ms,
            "bytes_per_round": moved.total / spec.stats.target_passes,
            "projected_speedup": {str(t): t * verify[1] / round_ms for t in TAUS}}
    return {"model": name, "layers": text["num_hidden_layers"], "past": past,
            "step_ms": verify[1], "floor_ms": floor, "step_over_floor": verify[1] / floor,
            "verify_over_step": {str(n): verify[n] / verify[1] for n in VERIFY_SIZES},
            "plain_decode_tok_s": plain.stats.tokens_per_second, "rounds": rounds}


def report(results: list[dict], device: str, bandwidth: float) -> None:
    print(f"\n{device}, bandwidth {bandwidth:.0f} GB/s (copy, read + write)")
    print("| model | layers | step ms | floor ms | step/floor | " +
          " | ".join(f"T={n}" for n in VERIFY_SIZES[1:]) + " |")
    print("|---" * (5 + len(VERIFY_SIZES) - 1) + "|")
    for r in results:
        ratios = " | ".join(f"{r['verify_over_step'][str(n)]:.2f}" for n in VERIFY_SIZES[1:])
        print(f"| {r['model']} | {r['layers']} | {r['step_ms']:.2f} | {r['floor_ms']:.2f} | "
              f"{r['step_over_floor']:.2f} | {ratios} |")
    print("\n| model | tree | identical | drafter call ms | verify ms | host ms (share) | "
          "KB/round | " + " | ".join(f"x at tau {t}" for t in TAUS) + " |")
    print("|---" * (7 + len(TAUS)) + "|")
    for r in results:
        for x in r["rounds"].values():
            speed = " | ".join(f"{x['projected_speedup'][str(t)]:.2f}" for t in TAUS)
            print(f"| {r['model']} | {tuple(x['tree'])} | {x['identical_to_plain']} | "
                  f"{x['drafter_call_ms']:.2f} | {x['verify_ms']:.2f} | {x['host_ms']:.2f} "
                  f"({x['host_share']:.1%}) | {x['bytes_per_round'] / 1024:.1f} | {speed} |")


def probe() -> dict:
    """What this machine offers the GPU path: GPUs (through libcudart, and nvidia-smi's
    list), ONNX Runtime's CUDA provider (or the CPU wheel shadowing it), TensorRT, torch."""
    from vispec.runtime.backends import cuda

    found = {"gpus": [], "cudart_error": None, "nvidia_smi": None, "tensorrt": None,
             "ort_cuda": CUDA in available_providers(), "ort_shadowed": shadowed_gpu_wheel(),
             "torch": None}
    if shutil.which("nvidia-smi"):
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
        found["nvidia_smi"] = (listed.stdout or listed.stderr).strip()
    try:
        found["gpus"] = [cuda.device_name(i) for i in range(cuda.device_count())]
    except VispecError as e:
        found["cudart_error"] = str(e)
    if importlib.util.find_spec("tensorrt"):
        try:
            import tensorrt
            found["tensorrt"] = tensorrt.__version__
        except (ImportError, OSError) as e:
            found["tensorrt"] = f"installed, import failed: {e}"
    if importlib.util.find_spec("torch"):
        import torch
        found["torch"] = f"{torch.__version__} ({'CUDA' if torch.cuda.is_available() else 'CPU'})"
    return found


def probe_rows(found: dict) -> list[tuple[str, str]]:
    ort_cuda = "yes" if found["ort_cuda"] else f"no ({found['ort_shadowed'] or 'install onnxruntime-gpu'})"
    return [("GPU", ", ".join(found["gpus"]) or "none found"),
            ("ONNX Runtime CUDA provider", ort_cuda),
            ("TensorRT", found["tensorrt"] or "not installed"),
            ("torch (builds the benchmark models)", found["torch"] or "not installed")]


def no_gpu_message(found: dict) -> str:
    why = (f"nvidia-smi: {found['nvidia_smi'] or 'not installed'}; libcudart: "
           f"{found['cudart_error'] or 'loaded, 0 devices'}")
    return (f"no GPU found ({why}). Nothing to check on this machine. Hint: run it on a "
            f"machine with an NVIDIA GPU and its driver; `python benchmarks/gpu.py --smoke` "
            f"checks the benchmark script on a CPU")


def _status(folder: Path, name: str) -> str:
    """What ``gpu_check.sh`` recorded for a stage: ok, failed (rc), timed out or skipped."""
    path = folder / f"{name}.rc"
    text = path.read_text().strip() if path.exists() else "not run"
    return {"0": "ok", "124": "timed out"}.get(text, text if not text.isdigit() else
                                               f"failed (exit {text})")


def test_row(folder: Path) -> str:
    status, xml = _status(folder, "tests"), folder / "tests.xml"
    if not xml.exists():
        return status
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failed = [c.get("name") for c in suite.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    return (f"{status}: {passed} passed, {counts['failures'] + counts['errors']} failed, "
            f"{counts['skipped']} skipped" + (f" ({', '.join(failed[:4])})" if failed else ""))


def bench_rows(folder: Path) -> list[tuple[str, str]]:
    status, path = _status(folder, "bench"), folder / "gpu.json"
    if not path.exists():
        return [("benchmarks/gpu.py", status)]
    rows = []
    for r in json.loads(path.read_text())["results"]:
        trees = "; ".join(f"{tuple(x['tree'])} identical={x['identical_to_plain']} "
                          f"x{x['projected_speedup']['3.0']:.2f} at tau 3"
                          for x in r["rounds"].values())
        rows.append((f"gpu.py {r['model']} ({r['layers']} layers)",
                     f"step {r['step_ms']:.2f} ms = {r['step_over_floor']:.2f}x floor; "
                     f"T=30 verify {r['verify_over_step']['30']:.2f}x step; {trees}"))
    return rows


def summary(folder: Path) -> None:
    """One table of a ``gpu_check.sh`` run: backends found, GPU tests, benchmark."""
    rows = probe_rows(json.loads((folder / "probe.json").read_text()))
    rows += [("GPU-marked tests", test_row(folder)), *bench_rows(folder)]
    width = max(len(name) for name, _ in rows)
    print(f"\n| {'check'.ljust(width)} | result |\n|{'-' * (width + 2)}|---|")
    for name, result in rows:
        print(f"| {name.ljust(width)} | {result} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="1b,7b")
    parser.add_argument("--layers-7b", type=int, default=8)
    parser.add_argument("--layers-1b", type=int, default=22)
    parser.add_argument("--past", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on the CPU provider (checks the script, no GPU)")
    parser.add_argument("--probe", type=Path, metavar="FILE",
                        help="write which GPU backends this machine has to FILE; exit 2 "
                             "without a GPU")
    parser.add_argument("--summary", type=Path, metavar="DIR",
                        help="print the table of a gpu_check.sh run kept in DIR")
    args = parser.parse_args(argv)
    if args.probe:
        found = probe()
        args.probe.write_text(json.dumps(found, indent=1))
        if not found["gpus"]:
            print(f"gpu_check: {no_gpu_message(found)}", file=sys.stderr)
            return 2
        for name, value in probe_rows(found):
            print(f"{name}: {value}")
        return 0
    if args.summary:
        if not (args.summary / "probe.json").exists():
            print(f"error: {args.summary} holds no probe.json. Expected: the folder of a "
                  f"gpu_check.sh run", file=sys.stderr)
            return 2
        summary(args.summary)
        return 0
    if args.smoke:
        backend, device, models = "ort", "cpu", ["smoke"]
    else:
        backend, device, models = "ort-cuda", "cuda", args.models.split(",")
        if CUDA not in available_providers():
            print(f"error: needs onnxruntime-gpu with a CUDA device (providers: "
                  f"{available_providers()}). Hint: {shadowed_gpu_wheel() or 'run on a GPU machine'}"
                  f", or --smoke", file=sys.stderr)
            return 2
    if device == "cuda":
        from vispec.runtime.backends.cuda import device_name
        name = device_name()
    else:
        name = platform.processor() or "cpu"
    log(f"device: {name}")
    bandwidth = bandwidth_gbs(device)
    results = []
    layers = {"7b": args.layers_7b, "1b": args.layers_1b}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        for model in models:
            text = dict(SHAPES[model])
            text["num_hidden_layers"] = min(text["num_hidden_layers"], layers.get(model, 99))
            _, artifacts, drafter = build(model, text, work, max_len=args.past + 128)
            results.append(measure(model, text, artifacts, drafter, backend, args.past,
                                   args.repeats, bandwidth))
    report(results, name, bandwidth)
    if args.json:
        args.json.write_text(json.dumps({"device": name, "bandwidth_gb_s": bandwidth,
                                         "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
