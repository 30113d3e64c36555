"""Quantized-weight graphs in the form TensorRT parses: standard ops, INT4 weight-only Q/DQ.

``export --weights int4`` writes ONNX Runtime contrib ops (``exporter/weight_quant.py``).
TensorRT parses neither, but takes INT4 weight-only quantization as an INT4 initializer
feeding a blocked ``DequantizeLinear`` (opset 21: ``axis``, ``block_size``; symmetric, no
zero point; blocks of 64 or 128 along one of the last two dimensions) feeding a ``MatMul``,
which it fuses into a weight-only GEMM. So, value for value:

    MatMulNBits(A, B [N, K/b, b/2] uint8, scales [N, K/b])
        -> MatMul(A, DequantizeLinear(W [K, N] int4, scales [K/b, N], axis=0, block_size=b))
    GatherBlockQuantized(table, ids, scales) -> Gather(dequantized float table, ids)

(an embedding gather reads S rows a step: its float table costs memory, not time).
TensorRT's INT4 is symmetric; a ``MatMulNBits`` with zero points (``--weights-method
minmax``, or ``gptq`` at int4) maps as ``d (q - z) = d (q - 8) + d (8 - z)``: the symmetric INT4 product plus
its block sums (a 0/1 float ``MatMul``) times the constant ``d (8 - z)`` (``[blocks, N]``).
Their LM head is 8-bit, so TensorRT takes them with ``--weights-exclude head``.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from vispec.runtime.errors import VispecError

TRT_INT4_BLOCKS = (64, 128)
DQ_OPSET = 21  # blocked DequantizeLinear
CONTRIB = "com.microsoft"
MINMAX_HEAD = (" (--weights-method minmax, and gptq at int4, keep the LM head 8-bit: add "
               "--weights-head int4, or --weights-exclude head)")


def _attrs(node) -> dict:
    from onnx import helper
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def unpack(stored: np.ndarray, bits: int, width: int) -> np.ndarray:
    """Signed values ``[..., width]`` of uint8 storage (``bits`` 4: two a byte, low nibble
    first) with the implied zero point 2^(bits-1)."""
    stored = stored.astype(np.int16)
    if bits == 4:
        stored = np.stack([stored & 0xF, stored >> 4], axis=-1).reshape(*stored.shape[:-1], -1)
    return (stored[..., :width] - 2 ** (bits - 1)).astype(np.int8)


def check_int4_blocks(bits: int, block: int, k: int, where: str) -> None:
    """TensorRT's INT4 weight-only quantization: 4 bits, blocks of 64 or 128 dividing K."""
    if bits != 4 or block not in TRT_INT4_BLOCKS or k % block:
        raise VispecError(
            f"{where}: {bits}-bit weights in blocks of {block} (K={k}). TensorRT takes INT4 "
            f"weight-only quantization with blocks of {' or '.join(map(str, TRT_INT4_BLOCKS))} "
            f"dividing K. Hint: export with `--weights int4 --weights-block "
            f"{next((b for b in TRT_INT4_BLOCKS[::-1] if k % b == 0), 64)}` for TensorRT, or "
            f"without --weights and build --precision fp16/int8{MINMAX_HEAD if bits == 8 else ''}")


def _zero_point_terms(graph, node, symmetric: str, scales: np.ndarray,
                      packed_zeros: np.ndarray) -> list:
    """Nodes adding ``d (8 - z)`` times the input's block sums to the symmetric product
    ``symmetric`` (output: the node's), for ``MatMulNBits`` zero points ``packed_zeros``
    (4-bit, two a byte, low nibble first; ``[N, ceil(blocks / 2)]``)."""
    from onnx import helper, numpy_helper

    a = _attrs(node)
    k, n, block = a["K"], a["N"], a["block_size"]
    blocks = scales.shape[1]
    zeros = unpack(packed_zeros.reshape(n, -1), 4, blocks).astype(np.float32) + 8
    indicator = np.zeros((k, blocks), np.float32)
    indicator[np.arange(k), np.arange(k) // block] = 1
    names = f"{node.name}_block_indicator", f"{node.name}_zero_terms"
    graph.initializer.extend([
        numpy_helper.from_array(indicator, names[0]),
        numpy_helper.from_array(np.ascontiguousarray((scales * (8 - zeros)).T), names[1])])
    sums, terms = f"{node.name}/block_sums", f"{node.name}/zero_terms"
    return [helper.make_node("MatMul", [node.input[0], names[0]], [sums], name=sums),
            helper.make_node("MatMul", [sums, names[1]], [terms], name=terms),
            helper.make_node("Add", [symmetric, terms], list(node.output), name=f"{node.name}_zero")]


def to_dequantize_linear(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Write ``src`` with its ``MatMulNBits`` as INT4 ``DequantizeLinear`` -> ``MatMul`` and
    its ``GatherBlockQuantized`` as a float ``Gather`` to ``dst`` (opset 21, external data
    in one file when over 2 GB)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper, version_converter

    model = onnx.load(str(src))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    nodes, used = [], set()
    for node in graph.node:
        if node.domain != CONTRIB or node.op_type not in ("MatMulNBits", "GatherBlockQuantized"):
            nodes.append(node)
            continue
        a = _attrs(node)
        weight = node.input[1 if node.op_type == "MatMulNBits" else 0]
        data, scales = numpy_helper.to_array(inits[weight]), numpy_helper.to_array(inits[node.input[2]])
        if node.op_type == "MatMulNBits":
            if any(node.input[4:]):
                raise VispecError(f"MatMulNBits {node.name!r} has a group index or a bias. "
                                  f"Expected the weights `export --weights` writes")
            k, n, bits, block = a["K"], a["N"], a["bits"], a["block_size"]
            check_int4_blocks(bits, block, k, f"{Path(src).name}: {node.name}")
            q = unpack(data.reshape(n, -1), bits, k).T  # [K, N]
            flat = np.pad(q.reshape(-1), (0, q.size % 2))  # INT4: row-major pairs (odd N too)
            packed = (flat[0::2] & 0xF) | ((flat[1::2] & 0xF) << 4)
            w, s = f"{node.input[1]}_int4", f"{node.input[2]}_kn"
            graph.initializer.extend([
                helper.make_tensor(w, TensorProto.INT4, [k, n], packed.astype(np.uint8).tobytes(), raw=True),
                numpy_helper.from_array(np.ascontiguousarray(scales.reshape(n, -1).T), s)])
            deq = f"{node.name}_dq"
            zeros = node.input[3] if len(node.input) > 3 and node.input[3] else None
            product = f"{node.name}/symmetric" if zeros else node.output[0]
            nodes += [helper.make_node("DequantizeLinear", [w, s], [deq], name=deq, axis=0,
                                       block_size=block),
                      helper.make_node("MatMul", [node.input[0], deq], [product],
                                       name=node.name)]
            if zeros:
                nodes += _zero_point_terms(graph, node, product, scales.reshape(n, -1),
                                           numpy_helper.to_array(inits[zeros]))
            used.update(i for i in node.input[1:4] if i)
        else:
            bits, block = a["bits"], a["block_size"]
            if a.get("gather_axis", 0) != 0 or a.get("quantize_axis", 1) not in (1, -1):
                raise VispecError(f"GatherBlockQuantized {node.name!r}: expected rows gathered "
                                  f"and blocks along a row, as `export --weights` writes them")
            rows, blocks = scales.shape
            q = unpack(data, bits, blocks * block).reshape(rows, blocks, block)
            table = (q * scales[..., None]).reshape(rows, -1).astype(scales.dtype)
            name = f"{node.input[0]}_float"
            graph.initializer.append(numpy_helper.from_array(table, name))
            nodes.append(helper.make_node("Gather", [name, node.input[1]], list(node.output),
                                          name=node.name, axis=0))
            used.update((node.input[0], node.input[2]))
    graph.ClearField("node")
    graph.node.extend(nodes)
    for name in used:
        graph.initializer.remove(inits[name])
    kept = [o for o in model.opset_import if o.domain != CONTRIB]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    model = version_converter.convert_version(model, DQ_OPSET)
    dst = Path(dst)
    large = sum(t.ByteSize() for t in model.graph.initializer) > 2 ** 31 - 2 ** 24
    onnx.save_model(model, str(dst), save_as_external_data=large, all_tensors_to_one_file=True,
                    location=f"{dst.name}.data")
    return dst
