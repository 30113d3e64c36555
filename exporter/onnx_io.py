"""``torch.onnx.export`` driven by a :class:`GraphSpec`, and a check of the file against it."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from vispec.runtime.errors import VispecError
from vispec.runtime.masks import causal_mask
from vispec.runtime.specs import ATTENTION_MASK, NEW, PAST, POSITION_IDS, GraphSpec

_ONNX_DTYPES = {
    onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.BOOL: "bool",
}


def example_feeds(spec: GraphSpec, sizes: dict[str, int], rng: np.random.Generator,
                  **fixed: np.ndarray) -> dict[str, np.ndarray]:
    """Inputs of ``spec`` at ``sizes``: floats N(0,1), position ids counting on after the past
    (the same on every M-RoPE row), a causal mask; ``fixed`` gives any other input."""
    feeds = {t.name: rng.standard_normal(spec.shape(t.name, sizes)).astype(t.dtype)
             for t in spec.inputs if t.dtype.startswith("float")}
    past, new = sizes.get(PAST, 0), sizes.get(NEW, 0)
    names = set(spec.input_names)
    if POSITION_IDS in names:
        positions = np.arange(past, past + new, dtype=np.int64)
        feeds[POSITION_IDS] = np.broadcast_to(positions, spec.shape(POSITION_IDS, sizes)).copy()
    if ATTENTION_MASK in names:
        feeds[ATTENTION_MASK] = causal_mask(past, new)
    return {**feeds, **fixed}


def export_graph(module: torch.nn.Module, spec: GraphSpec, example: dict[str, np.ndarray],
                 path: str | Path, opset: int) -> Path:
    """Export ``module`` called with ``example`` (in spec input order) to ``path``.

    Names and dynamic axes come from the spec only. Example dynamic dims must be > 2
    (an example dim of 1 is baked in as a constant by the tracer).
    """
    path = Path(path)
    args = tuple(torch.from_numpy(np.array(example[n])) for n in spec.input_names)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), input_names=spec.input_names,
                          output_names=spec.output_names, dynamic_axes=spec.dynamic_axes(),
                          opset_version=opset, dynamo=False, do_constant_folding=True)
    stamp_shapes(path, spec)
    check_graph_file(path, spec)
    return path


def stamp_shapes(path: str | Path, spec: GraphSpec) -> None:
    """Name the file's symbolic IO dims as the spec does, and pin dims the tracer left
    symbolic where the spec says static (a contradicting static dim is left for the
    check to report)."""
    model = onnx.load(str(path), load_external_data=False)
    declared = {t.name: t for t in spec.inputs + spec.outputs}
    for value in list(model.graph.input) + list(model.graph.output):
        t = declared.get(value.name)
        dims = value.type.tensor_type.shape.dim
        if t is None or len(dims) != len(t.shape):
            continue
        for d, want in zip(dims, t.shape):
            if isinstance(want, str):
                d.dim_param = want
            elif not d.HasField("dim_value"):
                d.dim_value = want
    onnx.save(model, str(path))


def check_graph_file(path: str | Path, spec: GraphSpec) -> None:
    """The ONNX file's inputs and outputs match the spec: names, dtypes, ranks, static dims.

    Every mismatch is collected before raising.
    """
    graph = onnx.load(str(path), load_external_data=False).graph
    problems = []
    for kind, declared, actual in (("input", spec.inputs, graph.input),
                                   ("output", spec.outputs, graph.output)):
        by_name = {v.name: v for v in actual}
        if set(by_name) != {t.name for t in declared}:
            problems.append(f"{kind} names {sorted(by_name)} != spec {[t.name for t in declared]}")
            continue
        for t in declared:
            tt = by_name[t.name].type.tensor_type
            dtype = _ONNX_DTYPES.get(tt.elem_type, str(tt.elem_type))
            dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in tt.shape.dim]
            if dtype != t.dtype:
                problems.append(f"{kind} {t.name!r} dtype {dtype}, spec {t.dtype}")
            if len(dims) != len(t.shape):
                problems.append(f"{kind} {t.name!r} rank {len(dims)}, spec {t.shape}")
                continue
            for got, want in zip(dims, t.shape):
                if isinstance(want, int) and got != want:
                    problems.append(f"{kind} {t.name!r} shape {dims}, spec {t.shape}")
                if isinstance(want, str) and isinstance(got, int) and got > 0:
                    problems.append(f"{kind} {t.name!r} has static dim {got} where the spec "
                                    f"says {want!r} is dynamic (shape {dims})")
    if problems:
        raise VispecError(f"exported {Path(path).name} does not match its spec: "
                          + "; ".join(problems))
