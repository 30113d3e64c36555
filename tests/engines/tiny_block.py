"""A tiny attention + MLP graph exported to ONNX, with its spec and an artifact folder."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vispec.runtime.manifest import GraphEntry, Manifest
from vispec.runtime.specs import Dim, GraphSpec, TensorSpec

HIDDEN = 32
SPEC = GraphSpec("block", inputs=(TensorSpec("x", "float32", (1, "new", HIDDEN)),),
                 outputs=(TensorSpec("y", "float32", (1, "new", HIDDEN)),),
                 dims=(Dim("new", 1, 8, 128),))


class Block(torch.nn.Module):
    """Pre-norm self-attention and MLP: linear layers, two activation matmuls, a softmax."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(HIDDEN)
        self.qkv = torch.nn.Linear(HIDDEN, 3 * HIDDEN)
        self.out = torch.nn.Linear(HIDDEN, HIDDEN)
        self.up = torch.nn.Linear(HIDDEN, 2 * HIDDEN)
        self.down = torch.nn.Linear(2 * HIDDEN, HIDDEN)

    def forward(self, x):  # [1, S, H]
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        attn = torch.softmax(q @ k.transpose(-1, -2) / HIDDEN ** 0.5, dim=-1)  # [1, S, S]
        x = x + self.out(attn @ v)
        return x + self.down(torch.relu(self.up(x)))


def feeds(new: int, seed: int) -> dict[str, np.ndarray]:
    x = np.random.default_rng(seed).standard_normal((1, new, HIDDEN)).astype(np.float32)
    return {"x": x}


def export_block(path: Path) -> Path:
    """Export the block (seeded weights) to ``path``, dynamic in ``new``."""
    torch.manual_seed(0)
    torch.onnx.export(Block().eval(), (torch.randn(1, 8, HIDDEN),), str(path),
                      input_names=SPEC.input_names, output_names=SPEC.output_names,
                      dynamic_axes=SPEC.dynamic_axes(), dynamo=False, opset_version=17)
    return path


def block_artifacts(folder: Path) -> Path:
    """An artifact folder holding the block as a one-graph drafter export."""
    folder.mkdir(parents=True)
    export_block(folder / "block.onnx")
    Manifest(kind="drafter", family="test", config_hash="0", max_len=128, opset=17, model={},
             graphs={"block": GraphEntry("block.onnx", SPEC)}).save(folder)
    return folder
