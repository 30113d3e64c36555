"""How long a one-token `vispec-export generate` takes from the shell, with torch installed.

Builds and exports a tiny LLaVA (needs torch, which is the point: the runtime must not pay
for it), then times the whole command `generate --max-new-tokens 1 --no-draft` (process
start, imports, session creation, prefill, one token) and, in the same run, a bare
`python -c pass` and the import of torch alone for scale.

    python benchmarks/startup.py [--repeats 5] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from vispec.exporter.export import export_target
from vispec.exporter.fixtures.models import build_tiny_model


def median_wall(cmd: list[str], repeats: int) -> float:
    """Median wall seconds of ``cmd`` over ``repeats`` runs (after one warm-up run)."""
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        if i:
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="vispec-startup-"))
    artifacts = work / "onnx"
    if not artifacts.exists():
        print(f"exporting a tiny LLaVA to {artifacts}", file=sys.stderr)
        export_target(build_tiny_model("llava", work / "model"), artifacts, max_len=256,
                      progress=lambda msg: None)
    cli = [sys.executable, "-m", "vispec.exporter.cli"]
    rows = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "python -c 'import torch'": [sys.executable, "-c", "import torch"],
        "vispec-export --version": cli + ["--version"],
        "generate --max-new-tokens 1": cli + ["generate", "--model", str(artifacts), "--prompt",
                                              "Hi", "--max-new-tokens", "1", "--no-draft"],
    }
    print(f"{platform.machine()}, {platform.processor() or 'cpu'}, python "
          f"{platform.python_version()}, median of {args.repeats} runs (torch installed)")
    print("| command | wall s |\n|---|---|")
    for name, cmd in rows.items():
        print(f"| {name} | {median_wall(cmd, args.repeats):.2f} |", flush=True)


if __name__ == "__main__":
    main()
