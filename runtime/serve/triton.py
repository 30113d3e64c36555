"""A Triton Inference Server model repository over exported artifacts (Python backend).

    OUT/<model>/config.pbtxt      decoupled (streaming) model, one Pipeline per instance,
                                  KIND_CPU for ONNX Runtime CPU, KIND_GPU for CUDA/TensorRT
    OUT/<model>/1/model.py        imports vispec.runtime (pip install vispec-export in the
                                  Python environment Triton's stub runs)
    OUT/<model>/1/target/         the artifacts (hard links where the file system allows)
    OUT/<model>/1/drafter/

Inputs: ``prompt`` (one user turn) or ``messages`` (a JSON conversation of HF chat
messages, whose ``{"type": "image"}`` parts take the images in order), ``images``
(encoded PNG/JPEG bytes), ``max_tokens``, ``temperature``, ``speculative``. Output: ``text``,
one response per accepted piece, then an empty final one.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from vispec.runtime.atomic import atomic_output_dir
from vispec.runtime.errors import VispecError
from vispec.runtime.manifest import Manifest

GPU_BACKENDS = ("ort-cuda", "tensorrt")
MODEL_PY = Path(__file__).with_name("triton_model.py")

CONFIG = """name: "{name}"
backend: "python"
max_batch_size: 0
model_transaction_policy {{ decoupled: true }}
input [
  {{ name: "prompt" data_type: TYPE_STRING dims: [ 1 ] optional: true }},
  {{ name: "messages" data_type: TYPE_STRING dims: [ 1 ] optional: true }},
  {{ name: "images" data_type: TYPE_STRING dims: [ -1 ] optional: true }},
  {{ name: "max_tokens" data_type: TYPE_INT32 dims: [ 1 ] optional: true }},
  {{ name: "temperature" data_type: TYPE_FP32 dims: [ 1 ] optional: true }},
  {{ name: "speculative" data_type: TYPE_BOOL dims: [ 1 ] optional: true }}
]
output [
  {{ name: "text" data_type: TYPE_STRING dims: [ 1 ] }}
]
instance_group [ {{ count: {instances} kind: {kind} }} ]
parameters {{ key: "backend" value: {{ string_value: "{backend}" }} }}
"""


def default_backend(artifacts: Path) -> str:
    """``tensorrt`` for built engines, else ONNX Runtime on the CPU."""
    return "tensorrt" if "tensorrt" in Manifest.load(artifacts).versions else "ort"


def write_repository(artifacts: str | os.PathLike, out_dir: str | os.PathLike, *,
                     drafter: str | os.PathLike | None = None, instances: int = 1,
                     model_name: str = "vispec", backend: str | None = None,
                     overwrite: bool = False) -> Path:
    """Write the repository to ``out_dir`` (atomically) and return its path."""
    artifacts = Path(artifacts)
    sources = {"target": artifacts, **({"drafter": Path(drafter)} if drafter else {})}
    for folder in sources.values():
        Manifest.load(folder)  # a clear error for a folder that is no export
    backend = backend or default_backend(artifacts)
    if instances < 1:
        raise VispecError(f"instances={instances}. Expected: >= 1")
    with atomic_output_dir(out_dir, overwrite, inputs=list(sources.values())) as tmp:
        version = tmp / model_name / "1"
        version.mkdir(parents=True)
        shutil.copyfile(MODEL_PY, version / "model.py")
        for what, folder in sources.items():
            shutil.copytree(folder, version / what, copy_function=_link_or_copy)
        kind = "KIND_GPU" if backend in GPU_BACKENDS else "KIND_CPU"
        (tmp / model_name / "config.pbtxt").write_text(CONFIG.format(
            name=model_name, instances=instances, kind=kind, backend=backend))
    return Path(out_dir)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
