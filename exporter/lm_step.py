"""Exportable language-model step over the HF model's own weights and submodules.

One graph serves prefill, decode and tree verification: an explicit boolean mask over
``past + new`` keys (any tree mask can be fed), per-layer past K/V in, the new tokens'
K/V out. Norms, MLPs, projections and the rotary tables are the HF modules themselves;
only attention over the explicit past is written here (as the tree mask requires).
"""
from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x [1, heads, S, hd]``, ``cos/sin [1, S, hd]`` (HF half-rotation convention)."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def mask_to_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean mask -> additive bias with a finite minimum of ``dtype`` (no NaN rows)."""
    return torch.where(mask, torch.zeros((), dtype=dtype),
                       torch.full((), torch.finfo(dtype).min, dtype=dtype))


def attend(layer_attn: torch.nn.Module, h: torch.Tensor, cos, sin, bias, past_k, past_v):
    """Self-attention of new rows ``h [1, S, H]`` over ``past [1, P, kvh, hd]`` + themselves.

    Returns the attention output ``[1, S, H]`` and the new rows' K/V ``[1, S, kvh, hd]``.
    """
    hd = layer_attn.head_dim
    s = h.shape[1]
    q = layer_attn.q_proj(h).view(1, s, -1, hd).transpose(1, 2)  # [1, nh, S, hd]
    k = layer_attn.k_proj(h).view(1, s, -1, hd).transpose(1, 2)  # [1, kvh, S, hd]
    v = layer_attn.v_proj(h).view(1, s, -1, hd).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    keys = torch.cat([past_k.transpose(1, 2), k], dim=2)  # [1, kvh, P+S, hd]
    values = torch.cat([past_v.transpose(1, 2), v], dim=2)
    groups = q.shape[1] // k.shape[1]
    keys = keys.repeat_interleave(groups, dim=1)  # [1, nh, P+S, hd]
    values = values.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, keys.transpose(-1, -2)) * layer_attn.scaling + bias
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    out = torch.matmul(probs, values).transpose(1, 2).reshape(1, s, -1)
    return layer_attn.o_proj(out), k.transpose(1, 2), v.transpose(1, 2)


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
        x = inputs_embeds  # [1, S, H]
        cos, sin = self.rotary(x, position_ids)  # [1, S, hd]
        bias = mask_to_bias(attention_mask, x.dtype)  # [1, 1, S, P+S]
        presents = []
        for i, layer in enumerate(self.layers):
            a, k, v = attend(layer.self_attn, layer.input_layernorm(x), cos, sin, bias,
                             past[2 * i], past[2 * i + 1])
            x = x + a
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            presents += [k, v]
        hidden = self.norm(x)
        return (self.lm_head(hidden), hidden, *presents)


class EmbedStep(torch.nn.Module):
    """``input_ids [1, S] -> inputs_embeds [1, S, H]`` (the model's own embedding)."""

    def __init__(self, embedding: torch.nn.Module):
        super().__init__()
        self.embedding = embedding

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(input_ids)
