"""int8 drafter weights for ONNX Runtime on CPU: weight-only blockwise quantization.

A drafter call after the target's pass finds its weights evicted from the CPU caches and is
bound by memory bandwidth; int8 weights read a quarter of the bytes. Every MatMul with a
constant weight (fusion, decoder layer, head) becomes ONNX Runtime's ``MatMulNBits`` with
8-bit symmetric weights in blocks of 32 along the input dimension, one scale per block;
``accuracy_level`` 4 runs it on int8 kernels, the activations quantized per block of 32 at
each call (8-bit kernels since ONNX Runtime 1.22: ``require_int8_weights_runtime``). Errors
stay ~1% of an output's magnitude, a tenth of per-tensor dynamic quantization's. The target
verifies every token, so output stays exact; only what the drafter proposes can move.
TensorRT parses none of this: it builds its own fp16/int8 engines from a float32 export.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

WEIGHTS = ("float32", "int8")
BLOCK = 32


def quantize_weights_int8(path: str | os.PathLike) -> Path:
    """Rewrite the ONNX graph at ``path`` in place with int8 MatMul weights. A graph stored
    with external data (over 2 GB in float32) keeps it, in one ``<name>.data`` file."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    path = Path(path)
    stored = onnx.load(str(path), load_external_data=False)
    external = {e.value for t in stored.graph.initializer for e in t.external_data
                if e.key == "location"}
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.WARNING)  # the quantizer logs every node at INFO
    try:
        quantizer = MatMulNBitsQuantizer(onnx.load(str(path)), bits=8, block_size=BLOCK,
                                         is_symmetric=True, accuracy_level=4)
        quantizer.process()
    finally:
        logging.getLogger().setLevel(level)
    quantizer.model.topological_sort()
    for name in external:
        (path.parent / name).unlink()
    onnx.save_model(quantizer.model.model, str(path), save_as_external_data=bool(external),
                    all_tensors_to_one_file=True, location=f"{path.name}.data")
    return path
