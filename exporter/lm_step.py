"""Exportable language-model step over the HF model's own weights and submodules.

One graph serves prefill, decode and tree verification: an explicit boolean mask over
``past + new`` keys (any tree mask can be fed), per-layer past K/V in, the new tokens'
K/V out. Norms, projection weights, activations and the rotary tables are the HF modules'
own; attention over the explicit past (as the tree mask requires) and the order of the
gated MLP's operations are written here.

Reduced precision (weights, KV cache and graph IO in float16): only the weight products run
at the weights' precision (each rounded once, like PyTorch's fused addmm); what PyTorch's
float16 forward keeps in float32 stays float32 (norm statistics, rotary tables, attention
scores, mask, softmax and weighted sum, which its SDPA kernels accumulate in float32), and
so does what it rounds to float16 between products (norm scaling, rotation, biases, the
MLP's activation and gating, the residual stream). The error is then that of the float16
weights themselves (docs/DESIGN.md). In a float32 export every cast is a no-op.
"""
from __future__ import annotations

import torch

ACCUMULATE = torch.float32  # residual stream, norms, rotary, attention core


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``x [1, heads, S, hd]``, ``cos/sin [1, S, hd]`` (HF half-rotation convention). The
    halves are cut at the Python int ``head_dim // 2``: constant slices in the graph (a
    traced ``chunk`` computes them from the shape, six nodes a call)."""
    half = head_dim // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def mask_to_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean mask -> additive bias with a finite minimum of ``dtype`` (no NaN rows)."""
    return torch.where(mask, torch.zeros((), dtype=dtype),
                       torch.full((), torch.finfo(dtype).min, dtype=dtype))


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``[1, S, n*hd] -> [1, n, S, hd]``."""
    return x.view(1, x.shape[1], -1, head_dim).transpose(1, 2)


def _share_kv(x: torch.Tensor, heads: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    """``[1, kvh, T, hd]`` -> ``[1, heads, T, hd]``, each KV head repeated for its query
    heads (``repeat_interleave``) by an expand and a reshape of constant shapes (Python ints:
    a traced ``repeat_interleave`` tiles through a dozen shape nodes)."""
    groups = heads // kv_heads
    return x[:, :, None].expand(-1, -1, groups, -1, -1).reshape(1, heads, -1, head_dim)


def project(linear: torch.nn.Linear, h: torch.Tensor) -> torch.Tensor:
    """``linear(h)`` in float32: the product at the weights' precision (rounded once, as a
    fused PyTorch addmm is), the bias added in float32."""
    out = torch.nn.functional.linear(h, linear.weight).to(ACCUMULATE)
    return out if linear.bias is None else out + linear.bias.to(ACCUMULATE)


def mlp(module: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    """The gated MLP ``down(act(gate(h)) * up(h))`` of Llama, Mistral and Qwen2 with the
    activation and the product in float32; ``h`` at the weights' precision."""
    gated = module.act_fn(project(module.gate_proj, h)) * project(module.up_proj, h)
    return project(module.down_proj, gated.to(h.dtype))


def attend(layer_attn: torch.nn.Module, h: torch.Tensor, cos, sin, bias, past_k, past_v):
    """Self-attention of new rows ``h [1, S, H]`` over ``past [1, P, kvh, hd]`` + themselves.

    ``h`` and the past are at the weights' precision, ``cos``/``sin``/``bias`` float32; the
    rotation and the attention core run in float32 on the keys and values as the cache
    holds them. Returns the attention output ``[1, S, H]`` (float32, for the residual) and
    the new rows' K/V ``[1, S, kvh, hd]`` at the weights' precision.
    """
    dtype, hd = h.dtype, layer_attn.head_dim
    q = apply_rope(_heads(project(layer_attn.q_proj, h), hd), cos, sin, hd)  # [1, nh, S, hd]
    k = apply_rope(_heads(project(layer_attn.k_proj, h), hd), cos, sin, hd).to(dtype)
    v = _heads(project(layer_attn.v_proj, h), hd).to(dtype)                  # [1, kvh, S, hd]
    keys = torch.cat([past_k.transpose(1, 2), k], dim=2)  # [1, kvh, P+S, hd]
    values = torch.cat([past_v.transpose(1, 2), v], dim=2)
    heads = (layer_attn.q_proj.out_features // hd, layer_attn.k_proj.out_features // hd, hd)
    keys = _share_kv(keys, *heads).to(ACCUMULATE)  # [1, nh, P+S, hd]
    values = _share_kv(values, *heads).to(ACCUMULATE)
    scores = torch.matmul(q, keys.transpose(-1, -2)) * layer_attn.scaling + bias
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, values).transpose(1, 2).reshape(1, h.shape[1], -1).to(dtype)
    return project(layer_attn.o_proj, out), k.transpose(1, 2), v.transpose(1, 2)


class LMStep(torch.nn.Module):
    """``(inputs_embeds, position_ids, attention_mask, *past) -> (logits, hidden, *present)``.

    ``past`` is flat: key.0, value.0, key.1, ... each ``[1, P, kvh, hd]``; ``hidden`` is the
    final post-norm hidden state (the drafters' feature).
    """

    def __init__(self, language_model: torch.nn.Module, lm_head: torch.nn.Module):
        super().__init__()
        self.layers = language_model.layers
        self.norm = language_model.norm
        self.rotary = language_model.rotary_emb
        self.lm_head = lm_head

    def forward(self, inputs_embeds, position_ids, attention_mask, *past):
        dtype = inputs_embeds.dtype  # the weights' precision
        x = inputs_embeds.to(ACCUMULATE)  # [1, S, H] residual stream
        cos, sin = self.rotary(x, position_ids)  # [1, S, hd], computed and kept in float32
        bias = mask_to_bias(attention_mask, ACCUMULATE)  # [1, 1, S, P+S]
        presents = []
        for i, layer in enumerate(self.layers):
            # HF norms scale in float32 when given float32 (weight promoted): one rounding
            a, k, v = attend(layer.self_attn, layer.input_layernorm(x).to(dtype), cos, sin, bias,
                             past[2 * i], past[2 * i + 1])
            x = x + a
            x = x + mlp(layer.mlp, layer.post_attention_layernorm(x).to(dtype))
            presents += [k, v]
        hidden = self.norm(x).to(dtype)
        return (self.lm_head(hidden), hidden, *presents)


class EmbedStep(torch.nn.Module):
    """``input_ids [1, S] -> inputs_embeds [1, S, H]`` (the model's own embedding)."""

    def __init__(self, embedding: torch.nn.Module):
        super().__init__()
        self.embedding = embedding

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(input_ids)


class ArgmaxStep(torch.nn.Module):
    """``logits [1, S, V] -> token_ids [1, S]``: the greedy choice, run where the logits are."""

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(-1)
