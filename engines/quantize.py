"""INT8 as explicit Q/DQ in the ONNX graph: the only INT8 form TensorRT 11 accepts.

Only the weight matmuls (MatMul with a constant B, Gemm, Conv) are quantized, with
symmetric int8 activations and symmetric per-output-channel int8 weights; softmax, norms,
attention score matmuls (both sides activations) and biases stay in float.

The graph is the same on every machine (byte for byte). Evaluating it is not: ONNX Runtime's
CPU provider fuses Q/DQ pairs into integer kernels, and on x86 CPUs without VNNI those use
``vpmaddubsw``, whose int16 pair sums saturate (errors ~10x the quantization error, e.g.
0.10 instead of 0.005 of max|y| on the test block under an emulated Haswell). TensorRT does
not saturate, so :func:`qdq_session` evaluates a Q/DQ graph with that fusion off: exactly the
ONNX Q/DQ semantics, on any CPU.
"""
from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)

from vispec.runtime.errors import VispecError
from vispec.runtime.masks import causal_mask
from vispec.runtime.specs import ATTENTION_MASK, INPUTS_EMBEDS, POSITION_IDS, GraphSpec

QUANT_OP_TYPES = ("MatMul", "Gemm", "Conv")
QDQ_OPTIONS = {
    "ActivationSymmetric": True,   # TensorRT needs zero points of 0
    "WeightSymmetric": True,
    "QuantizeBias": False,         # TensorRT fuses float biases itself
    "DedicatedQDQPair": True,      # a residual beside a linear layer stays unquantized
    "OpTypesToExcludeOutputQuantization": list(QUANT_OP_TYPES),  # Q/DQ on inputs only
    "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},  # B [in, out]: per output channel
}
DEFAULT_PROMPTS = (
    "Describe this picture in detail.",
    "What is the capital of France, and why is it famous?",
    "Write a short poem about the sea at night.",
    "List three ways to make a small garden more welcoming to bees.",
    "Explain step by step how a bicycle gear system works.",
)


class _Feeds(CalibrationDataReader):
    """Hands checked feed dicts to ONNX Runtime's calibrator, one batch at a time."""

    def __init__(self, feeds: Iterable[dict[str, np.ndarray]], spec: GraphSpec):
        feeds = iter(feeds)
        first = next(feeds, None)
        if first is None:
            raise VispecError(f"graph {spec.name!r}: the calibration data was empty. Expected "
                              f"at least one feed dict. Hint: pass a few real prompts")
        self.feeds, self.spec = itertools.chain([first], feeds), spec

    def get_next(self) -> dict[str, np.ndarray] | None:
        feed = next(self.feeds, None)
        if feed is not None:
            self.spec.check_inputs(feed)
        return feed


def quantize_qdq(onnx_in: str | os.PathLike, onnx_out: str | os.PathLike,
                 calibration: Iterable[dict[str, np.ndarray]], spec: GraphSpec) -> Path:
    """Write an INT8 Q/DQ copy of ``onnx_in`` to ``onnx_out``, calibrated (min/max) on the
    feed dicts of ``calibration``, each checked against ``spec``."""
    model = onnx.load(str(onnx_in), load_external_data=False)  # structure only
    picked = weight_nodes(model, spec.name)
    reader = _Feeds(calibration, spec)
    quantize_static(
        str(onnx_in), str(onnx_out), reader,
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=list(QUANT_OP_TYPES),
        nodes_to_quantize=picked,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        use_external_data_format=any(t.data_location == onnx.TensorProto.EXTERNAL
                                     for t in model.graph.initializer),
        extra_options=dict(QDQ_OPTIONS),
    )
    _unquantize_other_consumers(Path(onnx_out), set(picked))
    return Path(onnx_out)


def qdq_session(path: str | os.PathLike) -> ort.InferenceSession:
    """A CPU session that evaluates the Q/DQ graph at ``path`` as written (quantize, then
    dequantize, then float math), not through ONNX Runtime's CPU-dependent int8 kernels."""
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def weight_nodes(model: onnx.ModelProto, graph: str = "") -> list[str]:
    """Names of the nodes to quantize: MatMul/Gemm/Conv whose weight is an initializer
    (linear layers and convolutions, not the attention matmuls of two activations)."""
    weights = {t.name for t in model.graph.initializer}
    nodes = [n for n in model.graph.node
             if n.op_type in QUANT_OP_TYPES and len(n.input) > 1 and n.input[1] in weights]
    unnamed = [n.op_type for n in nodes if not n.name]
    if unnamed:
        raise VispecError(f"graph {graph!r}: {len(unnamed)} {sorted(set(unnamed))} nodes have "
                          f"no name, so they cannot be picked for quantization. Hint: "
                          f"re-export with torch.onnx.export (it names every node)")
    return [n.name for n in nodes]


def _unquantize_other_consumers(path: Path, picked: set[str]) -> None:
    """Give the float tensor back to nodes that were not picked but share a quantized input.

    ONNX Runtime rewires every consumer of a quantized activation onto its DequantizeLinear
    output, so e.g. a residual Add beside a linear layer would see int8 rounding.
    """
    model = onnx.load(str(path), load_external_data=False)  # weights stay where they are
    nodes = model.graph.node
    quantize_inputs = {n.output[0]: n.input[0] for n in nodes if n.op_type == "QuantizeLinear"}
    floats = {n.output[0]: quantize_inputs[n.input[0]] for n in nodes
              if n.op_type == "DequantizeLinear" and n.input[0] in quantize_inputs}
    for node in nodes:
        if node.name not in picked and node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            for i, name in enumerate(node.input):
                node.input[i] = floats.get(name, name)
    onnx.save(model, str(path))


def prefill_feeds(spec: GraphSpec, inputs_embeds: np.ndarray,
                  position_ids: np.ndarray) -> dict[str, np.ndarray]:
    """LM-step feeds of a prompt's prefill: ``inputs_embeds [L, H]`` and the prompt's
    position ids, a causal mask, and an empty past for every layer."""
    n = inputs_embeds.shape[0]
    sizes = {"new": n, "past": 0}
    feeds = {INPUTS_EMBEDS: inputs_embeds[None].astype(spec.tensor(INPUTS_EMBEDS).dtype),
             POSITION_IDS: np.asarray(position_ids, np.int64),
             ATTENTION_MASK: causal_mask(0, n)}
    for t in spec.inputs:
        if t.name not in feeds:
            feeds[t.name] = np.zeros(spec.shape(t.name, sizes), t.np_dtype)
    return feeds


def lm_calibration_feeds(artifact_dir: str | os.PathLike,
                         prompts: Iterable[str | tuple[str, list]] = DEFAULT_PROMPTS
                         ) -> Iterator[dict[str, np.ndarray]]:
    """Real prefill feeds of a target's ``lm`` graph, computed by its exported ONNX graphs.

    Each prompt is a text or ``(text, images)``; it goes through the model's own processor,
    embedding and vision graphs (ONNX Runtime), so image features are placed as at run time.
    """
    from vispec.runtime.target import TargetModel  # loads processors: only when used

    target = TargetModel(artifact_dir, backend="ort")
    spec = target.manifest.graph("lm").spec
    for item in prompts:
        text, images = (item, None) if isinstance(item, str) else item
        prompt = target.prepare(text, images)
        positions, _ = target.glue.position_ids(prompt)
        yield prefill_feeds(spec, target.prompt_embeds(prompt), positions)
