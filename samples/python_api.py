"""Embed vispec-export in an application: export once (torch), then generate (no torch).

    python samples/python_api.py [WORKDIR]

Builds a tiny LLaVA model and a random HiViS drafter in WORKDIR (no hub needed; without
WORKDIR in a temporary folder, removed at the end), exports
both, checks parity, and generates with and without drafting through one Pipeline.
"""
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from vispec.exporter.drafters.export import export_drafter
from vispec.exporter.export import export_target
from vispec.exporter.fixtures.drafters import build_tiny_drafter
from vispec.exporter.fixtures.models import build_tiny_model
from vispec.exporter.validate import validate_target
from vispec.runtime.pipeline import Pipeline
from vispec.runtime.sampling import Sampling
from vispec.runtime.tree import TreeConfig


def main(workdir: Path) -> None:
    # Export side (needs torch): a local HF folder in, ONNX graphs + manifest out.
    model_dir = build_tiny_model("llava", workdir / "model")
    export_target(model_dir, workdir / "target", max_len=256)
    assert all(row.passed for row in validate_target(model_dir, workdir / "target"))
    drafter_dir = build_tiny_drafter("hivis", model_dir, workdir / "drafter")
    export_drafter(drafter_dir, model_dir, workdir / "drafter-onnx", max_len=256)

    # Runtime side (numpy + onnxruntime): load once, generate many times.
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (56, 56, 3), np.uint8))
    pipe = Pipeline(workdir / "target", drafter_dir=workdir / "drafter-onnx",
                    tree=TreeConfig(total_tokens=16, depth=3, top_k=4))
    plain = pipe.generate("What is in the picture?", [image], max_new_tokens=24, draft=False)
    fast = pipe.generate("What is in the picture?", [image], max_new_tokens=24)
    print("plain      :", plain.tokens)
    print("speculative:", fast.tokens, f"({fast.stats.mean_accepted:.2f} tokens/pass)")
    assert plain.tokens == fast.tokens

    pipe.sampling = Sampling(temperature=0.7, top_p=0.9, seed=1)
    print("sampled    :", pipe.generate("Tell me a story.", max_new_tokens=12).text)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as workdir:
            main(Path(workdir))
