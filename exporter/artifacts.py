"""Write an artifact folder, the one recipe of both exporters (target and drafter):

    temporary folder (``atomic_output_dir``: a failure leaves nothing)
      for each GraphJob: export module -> <name>.onnx, then its rewrite (weight quantization)
      extras: host-side files (arrays, processor files, draft vocabulary)
      manifest.json: ArtifactInfo + one GraphEntry per job + extras + library versions
    renamed into place
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime
import torch
import transformers

from vispec.runtime.atomic import atomic_output_dir
from vispec.runtime.manifest import GraphEntry, Manifest, config_hash
from vispec.runtime.specs import GraphSpec

from .onnx_io import check_graph_file, export_graph


@dataclass(frozen=True)
class GraphJob:
    """One graph: ``module`` exported under ``spec`` to ``<name>.onnx``, traced on ``feeds``
    (or written by ``writer(path)`` without tracing: module and feeds unused); ``rewrite``
    (if any) then rewrites that file in place, announced by ``rewrite_note``."""

    name: str
    module: torch.nn.Module | None
    spec: GraphSpec
    feeds: dict[str, np.ndarray] | None
    rewrite: Callable[[Path], object] | None = None
    rewrite_note: str = ""
    writer: Callable[[Path], object] | None = None


@dataclass(frozen=True)
class ArtifactInfo:
    """The manifest's facts besides its graphs and files; ``source`` is the model folder
    the artifact is made from (its ``config.json`` hash ties the two)."""

    kind: str
    family: str
    source: Path
    max_len: int
    opset: int
    model: dict


def versions() -> dict[str, str]:
    """Library versions recorded in every manifest."""
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def write_artifact(out_dir: str | os.PathLike, info: ArtifactInfo, jobs: list[GraphJob], *,
                   inputs: list[Path], overwrite: bool = False,
                   extras: Callable[[Path], dict[str, str]] = lambda folder: {},
                   label: str = "", started: float | None = None,
                   progress: Callable[[str], None] = lambda msg: None) -> Manifest:
    """Write ``jobs`` and ``manifest.json`` into ``out_dir``, atomically. ``inputs``: the
    folders read (never written); ``extras(folder)`` writes the host-side files and returns
    the manifest's ``extra_files``; ``label`` names the graphs in progress lines
    (``"drafter "``); ``started``: when the export began (``time.perf_counter``)."""
    started = time.perf_counter() if started is None else started
    with atomic_output_dir(out_dir, overwrite, inputs=inputs) as tmp:
        graphs = {}
        for i, job in enumerate(jobs, 1):
            progress(f"[{i}/{len(jobs)}] exporting {label}{job.name} graph")
            path = tmp / f"{job.name}.onnx"
            if job.writer is None:
                export_graph(job.module.eval(), job.spec, job.feeds, path, info.opset)
            else:
                job.writer(path)
                check_graph_file(path, job.spec)
            if job.rewrite is not None:
                progress(f"[{i}/{len(jobs)}] {job.rewrite_note}")
                job.rewrite(tmp / f"{job.name}.onnx")
            graphs[job.name] = GraphEntry(f"{job.name}.onnx", job.spec)
        manifest = Manifest(kind=info.kind, family=info.family,
                            config_hash=config_hash(info.source), max_len=info.max_len,
                            opset=info.opset, model=info.model, graphs=graphs,
                            versions=versions(), extra_files=extras(tmp),
                            source=str(Path(info.source).resolve()))
        manifest.save(tmp)
    progress(f"exported {len(graphs)} {label}graphs to {out_dir} in "
             f"{time.perf_counter() - started:.1f}s")
    return manifest
