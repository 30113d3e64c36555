"""Weight-only blockwise quantization of an exported graph's constant weights (ONNX Runtime CPU).

On a CPU a decode step streams every weight from memory, so bytes are its cost: 8-bit
weights read a quarter of float32's, 4-bit an eighth. Round to nearest, symmetric, one
float scale per block of ``block`` weights along the input dimension:

- a ``MatMul`` with a constant weight ``[K, N]`` becomes ``MatMulNBits`` (blocks along K,
  ``accuracy_level`` 4: int8 kernels, the activations quantized per block at each call);
  MatMuls producing ``keep`` outputs (a target's ``logits``: its LM head) stay float;
- a ``Gather`` from a constant table ``[V, H]`` (an embedding) becomes
  ``GatherBlockQuantized`` (blocks along H; uint8 storage, 4-bit values packed two a byte
  low nibble first, zero point 2^(bits-1) implied), which dequantizes only the rows it reads.

Both are ONNX Runtime contrib ops (``vispec.runtime.weights``: CPU provider, >= 1.22);
``vispec.engines.weights_dq`` rewrites them into the standard-op form TensorRT parses.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Collection

import numpy as np

from vispec.runtime.errors import VispecError

BLOCKS = (32, 64, 128)
BLOCK = 32
ACCURACY_LEVEL = 4  # MatMulNBits: int8 compute on the blockwise-quantized activations


def check_block(block: int) -> None:
    if block not in BLOCKS:
        raise VispecError(f"weight block size {block}. Expected one of {BLOCKS}")


def quantize_matmuls(path: str | os.PathLike, bits: int, block: int = BLOCK,
                     keep: Collection[str] = ()) -> Path:
    """Rewrite the graph at ``path`` in place: every constant-weight MatMul (except those
    producing an output named in ``keep``) as ``MatMulNBits`` with ``bits``-bit weights."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    check_block(block)
    model = onnx.load(str(path))
    kept = [n.name for n in model.graph.node if n.op_type == "MatMul" and set(n.output) & set(keep)]
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.WARNING)  # the quantizer logs every node at INFO
    try:
        quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block, is_symmetric=True,
                                         accuracy_level=ACCURACY_LEVEL, nodes_to_exclude=kept)
        quantizer.process()
    finally:
        logging.getLogger().setLevel(level)
    fuse_shared_inputs(quantizer.model.model.graph)
    quantizer.model.topological_sort()
    return save_model(quantizer.model.model, path)


def fuse_shared_inputs(graph) -> None:
    """``MatMulNBits`` nodes reading the same input with the same layout (a layer's q/k/v,
    gate/up) as one over their weights stacked along N, its output split back: one kernel
    call instead of several, the same products."""
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in graph.initializer}
    groups: dict[tuple, list] = {}
    for node in graph.node:
        if node.op_type == "MatMulNBits" and len(node.input) == 3:
            a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
            key = (node.input[0], a["K"], a["bits"], a["block_size"], a.get("accuracy_level", 0))
            groups.setdefault(key, []).append((node, a["N"]))
    for (_, k, bits, block, level), members in groups.items():
        if len(members) < 2:
            continue
        first = members[0][0]
        for j, name in ((1, f"{first.name}_fused_q"), (2, f"{first.name}_fused_scales")):
            stacked = np.concatenate([numpy_helper.to_array(inits[n.input[j]]) for n, _ in members])
            graph.initializer.append(numpy_helper.from_array(stacked, name))
        for node, _ in members:
            for j in (1, 2):
                graph.initializer.remove(inits[node.input[j]])
        sizes = f"{first.name}_fused_sizes"
        graph.initializer.append(numpy_helper.from_array(np.array([n for _, n in members], np.int64), sizes))
        index = list(graph.node).index(first)
        for node, _ in members:
            graph.node.remove(node)
        fused = f"{first.name}_fused"
        graph.node.insert(index, helper.make_node(
            "Split", [fused, sizes], [o for node, _ in members for o in node.output], axis=-1,
            name=f"{fused}_split"))
        graph.node.insert(index, helper.make_node(
            "MatMulNBits", [first.input[0], f"{first.name}_fused_q", f"{first.name}_fused_scales"],
            [fused], name=fused, domain="com.microsoft", K=k, N=sum(n for _, n in members),
            bits=bits, block_size=block, accuracy_level=level))


def quantize_gathers(path: str | os.PathLike, bits: int, block: int = BLOCK) -> Path:
    """Rewrite the graph at ``path`` in place: every Gather over rows of a constant 2-D table
    as ``GatherBlockQuantized`` with ``bits``-bit values, blocks of ``block`` along a row."""
    import onnx
    from onnx import helper, numpy_helper

    check_block(block)
    model = onnx.load(str(path))
    graph = model.graph
    tables = {t.name: t for t in graph.initializer}
    for i, node in enumerate(graph.node):
        axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
        table = tables.get(node.input[0]) if node.op_type == "Gather" else None
        if table is None or len(table.dims) != 2 or axis != 0:
            continue
        packed, scales = pack_blocks(numpy_helper.to_array(table), bits, block)
        graph.initializer.extend([numpy_helper.from_array(packed, f"{table.name}_q{bits}"),
                                  numpy_helper.from_array(scales, f"{table.name}_scales")])
        graph.node[i].CopyFrom(helper.make_node(
            "GatherBlockQuantized", [f"{table.name}_q{bits}", node.input[1], f"{table.name}_scales"],
            list(node.output), name=node.name, domain="com.microsoft", bits=bits,
            block_size=block, gather_axis=0, quantize_axis=1))
        graph.initializer.remove(table)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return save_model(model, path)


def pack_blocks(table: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """``table [V, H]`` -> (uint8 values ``[V, H * bits / 8]``, scales ``[V, ceil(H / block)]``):
    symmetric round to nearest, ``q = round(x / s)`` in ``[-qmax, qmax]`` stored as
    ``q + 2^(bits-1)``, ``s = max |x| / qmax`` per block (``qmax = 2^(bits-1) - 1``)."""
    rows, width = table.shape
    blocks = -(-width // block)
    padded = np.zeros((rows, blocks * block), np.float32)
    padded[:, :width] = table
    padded = padded.reshape(rows, blocks, block)
    qmax = 2 ** (bits - 1) - 1
    scales = np.abs(padded).max(-1) / qmax
    safe = np.where(scales > 0, scales, 1.0)[..., None]
    q = np.clip(np.rint(padded / safe), -qmax, qmax).reshape(rows, -1)[:, :width]
    stored = (q + 2 ** (bits - 1)).astype(np.uint8)
    if bits == 4:
        stored = np.pad(stored, ((0, 0), (0, width % 2)))
        stored = stored[:, 0::2] | (stored[:, 1::2] << 4)
    return np.ascontiguousarray(stored), scales.astype(table.dtype)


def save_model(model, path: str | os.PathLike) -> Path:
    """Save ``model`` over ``path``. A graph stored with external data (over 2 GB in
    float32) keeps it, in one ``<name>.data`` file (its earlier data files removed)."""
    import onnx

    path = Path(path)
    stored = onnx.load(str(path), load_external_data=False)
    external = {e.value for t in stored.graph.initializer for e in t.external_data
                if e.key == "location"}
    for name in external:
        (path.parent / name).unlink()
    onnx.save_model(model, str(path), save_as_external_data=bool(external),
                    all_tensors_to_one_file=True, location=f"{path.name}.data")
    return path
