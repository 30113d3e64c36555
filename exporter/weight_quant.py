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

``quantize_minmax`` (``--weights-method minmax``) rounds 4-bit weights asymmetrically instead:
per block of ``block`` inputs a scale ``d = (max - min) / 15`` and ``q = round((w - min) / d)``
in 0..15, so ``w = d (q - z) + r`` with the integer zero point ``z = round(-min / d)`` that
``MatMulNBits`` takes and the block's float part ``r = min + d z`` (``|r| <= d / 2`` when the
block spans 0). A dequantized GGUF Q4_1 weight is ``min + d q`` exactly, so ``d (q - z)``
holds it but for ``r``, which ``MatMulNBits`` (integer zero points only; float ones run
~50x slower) cannot hold. ``r`` multiplies the block sums of ``x``, so one call computes it
all over ``x`` extended by those sums (``block_sums``: a 0/1 float MatMul)::

    x @ W = MatMulNBits([x, blocksums(x)], [q; r digits], [d; digit scales], [z; ...])

``r [K/b, N]`` stored in extra 4-bit blocks, each column's ``r`` over ``b`` blocks at a
time rounded min/max (error <= (max r - min r) / 30, ~0.4% of a weight's size; ``digits``
more blocks round what is left). Its LM head is 8-bit, symmetric, ``d = max |w| / 127``
(exact for GGUF Q8_0). With no digits (``--weights-method gptq`` at int4, whose weights GPTQ
put on such a grid) the product is ``MatMulNBits(x, q, d, z)`` alone.

All are ONNX Runtime contrib ops (``vispec.runtime.weights``: CPU provider, >= 1.22);
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
DIGITS = 1  # min/max: 4-bit digits of each block's float part


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


def quantize_minmax(path: str | os.PathLike, block: int = BLOCK, keep: Collection[str] = (),
                    int8: Collection[str] = (), digits: int = DIGITS) -> Path:
    """Rewrite the graph at ``path`` in place: every constant-weight MatMul as one
    ``MatMulNBits`` with 4-bit min/max weights and zero points over its input extended by its
    block sums (module docstring), except those producing an output named in ``keep`` (left
    float) or in ``int8`` (8-bit, symmetric, ``max |w| / 127`` a block: an LM head). MatMuls
    reading the same input (a standard graph's q/k/v, gate/up) become one call over their
    weights stacked along N, split back.

    Nodes per 4-bit input: ``MatMul(x, block_sums) -> Concat(x, sums) -> MatMulNBits`` (2
    more than round to nearest's one); the 0/1 ``block_sums`` matrix is one per K. ``digits``
    0: no float part, ``MatMulNBits(x)`` alone over each block's range widened to hold 0
    (``_min_max``; exact for GPTQ's zero-point grid)."""
    import onnx
    from onnx import helper, numpy_helper

    check_block(block)
    model = onnx.load(str(path))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    groups: dict[tuple[str, int], list] = {}
    for node in graph.node:
        weight = inits.get(node.input[1]) if node.op_type == "MatMul" else None
        if weight is None or len(weight.dims) != 2 or set(node.output) & set(keep):
            continue
        groups.setdefault((node.input[0], 8 if set(node.output) & set(int8) else 4), []).append(node)
    replaced = {}
    for (x, bits), members in groups.items():
        first = members[0].name or members[0].output[0]
        w = np.concatenate([numpy_helper.to_array(inits[n.input[1]]).astype(np.float32)
                            for n in members], axis=1)  # [K, N]
        k, n = w.shape
        product = f"{first}/nbits" if len(members) > 1 else members[0].output[0]
        if bits == 8:
            data, scales, _ = pack_symmetric(np.ascontiguousarray(w.T), block)
            nodes = [_nbits(graph, first, x, data, scales, None, product, k, 8, block)]
        else:
            data, scales, zeros = pack_minmax(np.ascontiguousarray(w.T), block, digits)
            source, width, nodes = x, k, []
            if digits > 0:  # over x extended by its block sums (the float part)
                sums, source = f"minmax.block_sums.{k}", f"{first}/extended"
                if sums not in inits:
                    inits[sums] = numpy_helper.from_array(block_sums(k, block, digits), sums)
                    graph.initializer.append(inits[sums])
                nodes = [helper.make_node("MatMul", [x, sums], [f"{first}/block_sums"],
                                          name=f"{first}_block_sums"),
                         helper.make_node("Concat", [x, f"{first}/block_sums"], [source],
                                          axis=-1, name=f"{first}_extended")]
                width = data.shape[1] * block
            nodes.append(_nbits(graph, first, source, data, scales, zeros, product, width, 4,
                                block))
        if len(members) > 1:
            graph.initializer.append(numpy_helper.from_array(
                np.array([inits[m.input[1]].dims[1] for m in members], np.int64),
                f"{first}.sizes"))
            nodes.append(helper.make_node("Split", [product, f"{first}.sizes"],
                                          [m.output[0] for m in members], axis=-1,
                                          name=f"{first}_split"))
        replaced[id(members[0])] = nodes
        replaced.update({id(m): [] for m in members[1:]})
    kept = [new for node in graph.node for new in replaced.get(id(node), [node])]
    graph.ClearField("node")
    graph.node.extend(kept)
    used = {i for node in graph.node for i in node.input}
    for name, tensor in inits.items():
        if name not in used and len(tensor.dims) == 2:
            graph.initializer.remove(tensor)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return save_model(model, path)


def _nbits(graph, first: str, x: str, data: np.ndarray, scales: np.ndarray,
           zeros: np.ndarray | None, output: str, k: int, bits: int, block: int):
    """A ``MatMulNBits`` node ``output = x @ weights`` over ``data``/``scales`` (and
    ``zeros``), its initializers added to ``graph`` under ``first``'s name."""
    from onnx import helper, numpy_helper

    names = [f"{first}.q{bits}", f"{first}.scales"] + ([f"{first}.zero_points"]
                                                        if zeros is not None else [])
    graph.initializer.extend(numpy_helper.from_array(a, name) for a, name in
                             zip((data, scales, zeros), names))
    return helper.make_node("MatMulNBits", [x, *names], [output], name=f"{first}_nbits",
                            domain="com.microsoft", K=k, N=len(scales), bits=bits,
                            block_size=block, accuracy_level=ACCURACY_LEVEL)


def block_sums(k: int, block: int, digits: int) -> np.ndarray:
    """``[K, pad + digits * S]`` float 0/1 (pad = ``-K % block``, S a multiple of ``block``):
    ``x @ it`` is ``pad`` zeros, then ``x``'s ``ceil(K / block)`` block sums zero-padded to S,
    ``digits`` times, so ``[x, x @ it]`` keeps every part on a block boundary."""
    pad, nb = -k % block, -(-k // block)
    width = -(-nb // block) * block
    out = np.zeros((k, pad + digits * width), np.float32)
    for digit in range(digits):
        out[np.arange(k), pad + digit * width + np.arange(k) // block] = 1
    return out


def _blocks(weight: np.ndarray, block: int) -> np.ndarray:
    """``weight [N, K]`` -> ``[N, ceil(K / block), block]``, a last partial block padded with
    its last column (which changes neither its minimum nor its maximum)."""
    rows, width = weight.shape
    pad = -width % block
    return np.pad(weight, ((0, 0), (0, pad)), mode="edge").reshape(rows, -1, block)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """``q [..., 2m]`` in 0..15 -> uint8 ``[..., m]``, low nibble first."""
    q = q.astype(np.uint8)
    return np.ascontiguousarray(q[..., 0::2] | (q[..., 1::2] << 4))


def _min_max(blocks: np.ndarray, hold_zero: bool = False
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """4-bit min/max rounding of ``blocks [..., block]``: ``q`` in 0..15, scale ``d = (max -
    min) / 15``, zero point ``z = round(-min / d)`` in 0..15 and the float part ``min + d z``
    (``blocks = d (q - z) + min + d z`` up to rounding q; within ``d / 2`` of 0 when the
    block spans 0). ``hold_zero``: the range widened to hold 0 first (``min <= 0 <= max``)."""
    low, high = blocks.min(-1), blocks.max(-1)
    if hold_zero:
        low, high = np.minimum(low, 0), np.maximum(high, 0)
    scales = (high - low) / 15
    safe = np.where(scales > 0, scales, 1.0)
    q = np.clip(np.rint((blocks - low[..., None]) / safe[..., None]), 0, 15)
    zeros = np.clip(np.rint(-low / safe), 0, 15)
    return q, scales, zeros, low + scales * zeros


def pack_minmax(weight: np.ndarray, block: int, digits: int = DIGITS
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``weight [N, K]`` -> ``MatMulNBits`` 4-bit data ``[N, B, block / 2]``, scales ``[N, B]``
    and packed zero points ``[N * ceil(B / 2)]`` over ``[x, x @ block_sums(K, block, digits)]``
    (B = nb + digits * S / block, nb = ceil(K / block)). A block of inputs: ``w = d (q - z) +
    r`` (``_min_max``); the float parts ``r [N, nb]`` are the weights of the block sums, each
    further digit rounding (4-bit min/max) what the digits before left of them. ``digits``
    0: over ``x`` alone (B = nb), each block's range held to 0 and its float part dropped."""
    q, scales, zeros, offsets = _min_max(_blocks(weight, block), hold_zero=digits == 0)
    rows, nb = scales.shape
    left = np.zeros((rows, -(-nb // block) * block))
    left[:, :nb] = offsets
    left = left.reshape(rows, -1, block)
    parts = [(q, scales, zeros)]
    for _ in range(digits):
        dq, ds, dz, _ = _min_max(left)
        parts.append((dq, ds, dz))
        left = left - ds[..., None] * (dq - dz[..., None])
    q, scales, zeros = (np.concatenate(part, axis=1) for part in zip(*parts))
    zeros = np.pad(zeros, ((0, 0), (0, zeros.shape[1] % 2)))
    return _nibbles(q), scales.astype(np.float32), _nibbles(zeros).reshape(-1)


def pack_symmetric(weight: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray, None]:
    """``weight [N, K]`` -> ``MatMulNBits`` 8-bit data ``[N, nb, block]`` and scales
    ``[N, nb]``: ``pack_blocks``' 8-bit rounding (``d = max |w| / 127`` a block, the grid of
    GGUF Q8_0), a last partial block padded with stored zeros."""
    stored, scales = pack_blocks(weight, 8, block)
    stored = np.pad(stored, ((0, 0), (0, -weight.shape[1] % block)), constant_values=128)
    return stored.reshape(len(weight), -1, block), scales.astype(np.float32), None


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
