"""The manifest saved beside exported graphs: what was exported, from what, with which IO."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ManifestError
from .model_dir import not_a_folder
from .specs import LOGITS, GraphSpec

MANIFEST_NAME = "manifest.json"
FORMAT = "vispec-manifest/1"
PROCESSOR_DIR = "processor"  # tokenizer, processor and config.json copied from the model
EXPORT_COMMAND = {"target": "export", "drafter": "export-drafter"}  # writes each kind
OPSETS = range(14, 21)  # exportable: SDPA needs 14; 20 is the TorchScript exporter's newest
# The model facts the runtime reads, per kind.
REQUIRED_FACTS = {"target": ("num_layers", "hidden_size", "vocab_size", "head_dim", "kv_heads",
                             "eos_token_ids"),
                  "drafter": ("drafter_type", "hidden_size", "vocab_size", "head_dim", "kv_heads",
                              "top_k", "num_q", "residual_rows")}


@dataclass(frozen=True)
class GraphEntry:
    """One exported graph: its file (relative to the artifact dir) and its IO spec."""

    file: str
    spec: GraphSpec


@dataclass
class Manifest:
    """Everything the engine builder and the runtime need to know about an artifact dir.

    ``kind`` is ``"target"`` or ``"drafter"``; ``model`` holds the architecture facts the
    runtime needs (layers, heads, token ids, ...); ``extra_files`` names host-side arrays
    saved beside the graphs (e.g. LLaVA-NeXT's ``image_newline``).
    """

    kind: str
    family: str
    config_hash: str
    max_len: int
    opset: int
    model: dict
    graphs: dict[str, GraphEntry]
    versions: dict = field(default_factory=dict)
    extra_files: dict = field(default_factory=dict)
    source: str = ""

    def to_dict(self) -> dict:
        return {
            "format": FORMAT, "kind": self.kind, "family": self.family,
            "config_hash": self.config_hash, "max_len": self.max_len, "opset": self.opset,
            "model": self.model, "versions": self.versions, "source": self.source,
            "extra_files": self.extra_files,
            "graphs": {k: {"file": g.file, "spec": g.spec.to_dict()}
                       for k, g in self.graphs.items()},
        }

    def save(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / MANIFEST_NAME
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike, kind: str | None = None) -> "Manifest":
        """Read and check ``directory/manifest.json`` and that every file it names exists;
        with ``kind``, also that it is of that kind with every model fact the runtime reads."""
        directory = Path(directory)
        path = directory / MANIFEST_NAME
        if not directory.is_dir():
            raise ManifestError(f"artifact folder {directory} {not_a_folder(directory)}. Hint: "
                                f"pass the output folder of `vispec-export export` (or "
                                f"export-drafter)")
        if not path.is_file():
            raise ManifestError(f"no {MANIFEST_NAME} in {directory}. Hint: point at a folder "
                                f"written by `vispec-export export`")
        try:
            d = json.loads(path.read_text())
            if not isinstance(d, dict):
                raise TypeError(f"a JSON {type(d).__name__}, expected an object")
            if d.get("format") != FORMAT:
                raise ValueError(f"format {d.get('format')!r}, expected {FORMAT!r}")
            m = cls(kind=d["kind"], family=d["family"], config_hash=d["config_hash"],
                    max_len=int(d["max_len"]), opset=int(d["opset"]), model=dict(d["model"]),
                    versions=dict(d.get("versions", {})), source=d.get("source", ""),
                    extra_files=dict(d.get("extra_files", {})),
                    graphs={k: GraphEntry(g["file"], GraphSpec.from_dict(g["spec"]))
                            for k, g in d["graphs"].items()})
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ManifestError(f"{path} is corrupt ({type(e).__name__}: {e}). Hint: "
                                f"re-run `vispec-export export` into a fresh folder") from e
        if kind is not None:
            m._check_kind(kind, path)
        missing = [f for f in [g.file for g in m.graphs.values()] + list(m.extra_files.values())
                   if not (directory / f).exists()]
        if missing:
            raise ManifestError(f"{path} names files that are missing: {missing}. Hint: copy "
                                f"the whole artifact folder, or re-export")
        m._check_vocab(path)
        return m

    def _check_kind(self, kind: str, path: Path) -> None:
        """This is a ``kind`` export whose ``model`` holds every fact the runtime reads."""
        if self.kind != kind:
            raise ManifestError(f"{path.parent} holds a {self.kind!r} export, not a {kind}. "
                                f"Hint: pass the folder written by `vispec-export "
                                f"{EXPORT_COMMAND[kind]}`")
        missing = [k for k in REQUIRED_FACTS[kind] if k not in self.model]
        if missing:
            raise ManifestError(f"{path}: the model facts lack {missing}. Hint: the manifest "
                                f"was edited or is from another version; re-run `vispec-export "
                                f"{EXPORT_COMMAND[kind]}` into a fresh folder")

    def _check_vocab(self, path: Path) -> None:
        """The model's ``vocab_size`` must be the width of every graph's logits."""
        vocab = self.model.get("vocab_size")
        for name, g in self.graphs.items():
            logits = next((t for t in g.spec.outputs if t.name == LOGITS), None)
            if vocab is not None and logits is not None and logits.shape[-1] != vocab:
                raise ManifestError(f"{path}: model vocab_size {vocab} but graph {name!r} "
                                    f"outputs {logits.shape[-1]} logits. Hint: the manifest "
                                    f"was edited or mixed up; re-export into a fresh folder")

    def graph(self, name: str) -> GraphEntry:
        if name not in self.graphs:
            raise ManifestError(f"manifest has no graph {name!r} (has {sorted(self.graphs)})")
        return self.graphs[name]


def config_hash(model_dir: str | os.PathLike) -> str:
    """sha256 of a model directory's config.json: ties artifacts to the model they came from."""
    return hashlib.sha256((Path(model_dir) / "config.json").read_bytes()).hexdigest()[:16]
