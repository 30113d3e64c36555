"""The LM step written for ONNX Runtime's fused CPU kernels (``--attention gqa``).

Same inputs and outputs as ``lm_step``'s graph except the KV cache: each layer's past and
present are one ``[1, kv_heads, max_len, head_dim]`` buffer (``kv_gqa_tensors``), bound
to both, into which ``GroupQueryAttention`` writes the new rows in place. Per layer::

    x ─► SkipSimplifiedLayerNorm ─► MatMul(q|k|v) ─► GroupQueryAttention ─► MatMul(o) ─┐
    (residual add + RMS norm)        one product     rotary at position_ids,           │
                                                     tree mask as attention bias,      │
                                                     K/V written into the cache        │
    ┌─ MatMul(down) ◄─ Sigmoid·Mul·Mul ◄─ Split ◄─ MatMul(gate|up) ◄─ SkipSimplifiedLayerNorm
    └─► next layer's SkipSimplifiedLayerNorm (adds it to the residual stream)

The LM head runs on ``logit_rows`` only (a prompt's prefill: its last row).
14 nodes a layer instead of ~200: on a CPU a decode step of a small model is bound by
per-node overhead as much as by weight bytes. Rotary tables are the HF rotary module's own
(any rope scaling it implements), precomputed for ``max_len`` positions. Float32 only;
``weight_quant`` turns the MatMuls into ``MatMulNBits`` as in the standard graph.
GroupQueryAttention, SkipSimplifiedLayerNormalization are ONNX Runtime contrib ops: the
TensorRT builder refuses this form (``engines.build``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vispec.runtime.errors import VispecError
from vispec.runtime.specs import (
    ATTENTION_MASK,
    HIDDEN_STATES,
    INPUTS_EMBEDS,
    LOGIT_ROWS,
    LOGITS,
    POSITION_IDS,
    GraphSpec,
    past_names,
    present_names,
)

MS = "com.microsoft"
OPSETS = (("", 17), (MS, 1))
PROTO_LIMIT = 1 << 31  # bytes a single ONNX protobuf may hold


def check_gqa_model(text_config: dict, mrope: bool, dtype: str) -> None:
    """Refuse a model this form cannot express (before its weights load), with the form
    that can."""
    act = text_config.get("hidden_act")
    problems = []
    if mrope:
        problems.append("M-RoPE positions (3 rows) do not fit the fused rotary")
    if dtype != "float32":
        problems.append(f"dtype {dtype} (the fused form is float32; quantize with --weights)")
    if act != "silu":
        problems.append(f"MLP activation {act!r} (the fused form has SiLU)")
    if problems:
        raise VispecError(f"--attention gqa: {'; '.join(problems)}. Hint: export with "
                          f"--attention standard")


class _Graph:
    """Nodes and initializers being collected, with unique names."""

    def __init__(self):
        self.nodes, self.inits = [], []

    def init(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str] | int, name: str,
             domain: str = "", **attrs) -> list[str]:
        from onnx import helper
        if isinstance(outputs, int):
            outputs = [f"{name}/out{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain,
                                           **attrs))
        return outputs


def _weight(linear: torch.nn.Linear) -> np.ndarray:
    """``[in, out]`` float32 (MatMul's layout)."""
    return linear.weight.detach().float().numpy().T


def _bias(linears: list[torch.nn.Linear]) -> np.ndarray | None:
    if all(lin.bias is None for lin in linears):
        return None
    return np.concatenate([lin.bias.detach().float().numpy() if lin.bias is not None
                           else np.zeros(lin.out_features, np.float32) for lin in linears])


def _norm_weight(norm: torch.nn.Module) -> tuple[np.ndarray, float]:
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    return norm.weight.detach().float().numpy(), float(eps)


def _linear(g: _Graph, x: str, linears: list[torch.nn.Linear], name: str) -> str:
    """``x @ [W1 | W2 | ...]`` (+ bias): one product over the stacked weights."""
    out = g.node("MatMul", [x, g.init(f"{name}.weight", np.concatenate(
        [_weight(lin) for lin in linears], axis=1))], 1, name)[0]
    bias = _bias(linears)
    return out if bias is None else g.node("Add", [out, g.init(f"{name}.bias", bias)], 1,
                                           f"{name}.add_bias")[0]


def _rotary_tables(rotary: torch.nn.Module, max_len: int, head_dim: int) -> tuple:
    """``cos, sin [max_len, head_dim / 2]`` from the HF rotary module (half rotation)."""
    positions = torch.arange(max_len)[None]
    with torch.no_grad():
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
    return (cos[0, :, :head_dim // 2].float().numpy(), sin[0, :, :head_dim // 2].float().numpy())


def _preamble(g: _Graph) -> tuple[str, str, str]:
    """``seqlens_k [1]`` (last key index), ``total [ ]`` (keys) from the mask's width, and
    the mask as an additive float bias."""
    width = g.node("Shape", [ATTENTION_MASK], 1, "mask_width", start=3, end=4)[0]
    total1 = g.node("Cast", [width], 1, "total_i32", to=6)[0]  # int32
    seqlens = g.node("Sub", [total1, g.init("one_i32", np.ones(1, np.int32))], 1, "seqlens_k")[0]
    total = g.node("Squeeze", [total1, g.init("axis0", np.zeros(1, np.int64))], 1, "total")[0]
    bias = g.node("Where", [ATTENTION_MASK, g.init("zero_f32", np.zeros((), np.float32)),
                            g.init("min_f32", np.array(np.finfo(np.float32).min, np.float32))],
                  1, "mask_bias")[0]
    return seqlens, total, bias


def build_gqa_lm(language_model: torch.nn.Module, lm_head: torch.nn.Linear, spec: GraphSpec):
    """The ONNX model (``onnx.ModelProto``) of the fused LM step for ``spec``."""
    from onnx import helper

    g = _Graph()
    max_len = spec.tensor(past_names(0)[0]).shape[2]  # the cache buffer's length
    layers = language_model.layers
    attn0 = layers[0].self_attn
    head_dim = attn0.head_dim
    heads = attn0.q_proj.out_features // head_dim
    kv_heads = attn0.k_proj.out_features // head_dim
    cos, sin = _rotary_tables(language_model.rotary_emb, max_len, head_dim)
    cos, sin = g.init("rotary.cos", cos), g.init("rotary.sin", sin)
    seqlens, total, bias = _preamble(g)
    x, pending = INPUTS_EMBEDS, None  # residual stream; the output still to add to it
    for i, layer in enumerate(layers):
        w, eps = _norm_weight(layer.input_layernorm)
        w = g.init(f"layers.{i}.input_norm", w)
        if pending is None:
            h = g.node("SimplifiedLayerNormalization", [x, w], 1, f"layers.{i}.input_norm",
                       epsilon=eps, axis=-1)[0]
        else:
            h, x = g.node("SkipSimplifiedLayerNormalization", [pending, x, w],
                          [f"layers.{i}.h", "", "", f"layers.{i}.x"], f"layers.{i}.input_norm",
                          domain=MS, epsilon=eps)[::3]
        a = layer.self_attn
        qkv = _linear(g, h, [a.q_proj, a.k_proj, a.v_proj], f"layers.{i}.qkv")
        past_k, past_v = past_names(i)
        out = g.node("GroupQueryAttention",
                     [qkv, "", "", past_k, past_v, seqlens, total, cos, sin, POSITION_IDS, bias],
                     [f"layers.{i}.attn", *present_names(i)], f"layers.{i}.attention", domain=MS,
                     num_heads=heads, kv_num_heads=kv_heads, scale=float(a.scaling),
                     do_rotary=1, rotary_interleaved=0)[0]
        o = _linear(g, out, [a.o_proj], f"layers.{i}.o_proj")
        w, eps = _norm_weight(layer.post_attention_layernorm)
        h, x = g.node("SkipSimplifiedLayerNormalization",
                      [o, x, g.init(f"layers.{i}.post_norm", w)],
                      [f"layers.{i}.h2", "", "", f"layers.{i}.x2"], f"layers.{i}.post_norm",
                      domain=MS, epsilon=eps)[::3]
        m = layer.mlp
        gate_up = _linear(g, h, [m.gate_proj, m.up_proj], f"layers.{i}.gate_up")
        gate, up = g.node("Split", [gate_up], 2, f"layers.{i}.split", axis=-1)
        act = g.node("Mul", [gate, g.node("Sigmoid", [gate], 1, f"layers.{i}.sigmoid")[0]], 1,
                     f"layers.{i}.silu")[0]
        gated = g.node("Mul", [act, up], 1, f"layers.{i}.gated")[0]
        pending = _linear(g, gated, [m.down_proj], f"layers.{i}.down_proj")
    w, eps = _norm_weight(language_model.norm)
    g.node("SkipSimplifiedLayerNormalization", [pending, x, g.init("norm", w)],
           [HIDDEN_STATES], "norm", domain=MS, epsilon=eps)
    rows = g.node("Gather", [HIDDEN_STATES, LOGIT_ROWS], 1, "logit_rows", axis=1)[0]
    head = g.node("MatMul", [rows, g.init("lm_head.weight", _weight(lm_head))],
                  [LOGITS if lm_head.bias is None else "lm_head/out"], "lm_head")[0]
    if lm_head.bias is not None:
        g.node("Add", [head, g.init("lm_head.bias", lm_head.bias.detach().float().numpy())],
               [LOGITS], "lm_head.add_bias")
    graph = helper.make_graph(g.nodes, spec.name, value_infos(spec.inputs),
                              value_infos(spec.outputs), initializer=g.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in OPSETS],
                             producer_name="vispec-export")


def value_infos(tensors) -> list:
    """ONNX value infos of spec tensors (graph inputs or outputs)."""
    from onnx import helper
    from onnx.helper import np_dtype_to_tensor_dtype
    return [helper.make_tensor_value_info(t.name, np_dtype_to_tensor_dtype(t.np_dtype),
                                          list(t.shape)) for t in tensors]


def write_gqa_lm(language_model: torch.nn.Module, lm_head: torch.nn.Linear, spec: GraphSpec,
                 path: str | Path) -> Path:
    """Write the fused LM step to ``path`` (weights in ``<name>.data`` beside it when the
    model exceeds a protobuf's 2 GB)."""
    import onnx

    model = build_gqa_lm(language_model, lm_head, spec)
    path = Path(path)
    external = model.ByteSize() >= PROTO_LIMIT
    onnx.save_model(model, str(path), save_as_external_data=external,
                    all_tensors_to_one_file=True, location=f"{path.name}.data")
    return path
