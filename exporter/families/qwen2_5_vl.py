"""Qwen2.5-VL export adapter: an exportable vision tower + merger on the HF weights.

The HF tower computes its window plan with data-dependent Python (``get_vision_window_index``)
and attends by splitting over ``cu_seqlens``; neither exports. This module takes the plan as
graph inputs (see ``vispec.runtime.families.qwen2_5_vl``) and attends over block-diagonal
boolean masks instead.
"""
from __future__ import annotations

import torch
from torch import nn

from vispec.runtime.families.qwen2_5_vl import Qwen25VLGlue

from .base import FamilyExport, register


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class _MaskedVisionAttention(nn.Module):
    """HF ``Qwen2_5_VLVisionAttention`` weights, attention over an additive ``[N, N]`` bias.

    Dense masks cost O(N^2) memory and time; real image sizes (thousands of patches) need
    windowed batched attention (windows as a batch axis) instead.
    """

    def __init__(self, hf_attn: nn.Module):
        super().__init__()
        self.qkv, self.proj = hf_attn.qkv, hf_attn.proj
        self.num_heads, self.scaling = hf_attn.num_heads, hf_attn.scaling

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                bias: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        qkv = self.qkv(x).reshape(n, 3, self.num_heads, -1).permute(1, 2, 0, 3)
        q, k, v = qkv.unbind(0)                                               # [heads, N, d]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        scores = torch.matmul(q, k.transpose(1, 2)) * self.scaling + bias  # [heads, N, N]
        out = torch.matmul(scores.softmax(dim=-1), v)                       # [heads, N, d]
        return self.proj(out.transpose(0, 1).reshape(n, -1))


class _VisionBlock(nn.Module):
    def __init__(self, hf_block: nn.Module):
        super().__init__()
        self.norm1, self.norm2, self.mlp = hf_block.norm1, hf_block.norm2, hf_block.mlp
        self.attn = _MaskedVisionAttention(hf_block.attn)

    def forward(self, x, cos, sin, bias):
        x = x + self.attn(self.norm1(x), cos, sin, bias)
        return x + self.mlp(self.norm2(x))


class Qwen25VLVision(nn.Module):
    """Vision tower + merger; ``forward`` takes the vision spec's inputs in order.

    ``pixel_values [P, C*T*p*p]``, ``vision_position_ids [P, 2]``, ``window_index [M]``,
    ``window_attention_mask``/``full_attention_mask [P, P]`` -> ``image_features [M, out]``
    in the original merged-token order (P patches, M = P / merge_unit tokens).
    """

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.patch_embed, self.merger = visual.patch_embed, visual.merger
        self.blocks = nn.ModuleList(_VisionBlock(b) for b in visual.blocks)
        self.full_attention = set(visual.fullatt_block_indexes)
        self.unit = visual.spatial_merge_unit
        self.register_buffer("inv_freq", visual.rotary_pos_emb.inv_freq.detach().clone(),
                             persistent=False)

    def _to_windows(self, x: torch.Tensor, window_index: torch.Tensor) -> torch.Tensor:
        """Reorder per-patch rows ``[P, ...]`` by merged token into windowed order."""
        grouped = x.reshape(-1, self.unit, *x.shape[1:])  # [M, unit, ...]
        return grouped[window_index].reshape(x.shape)

    def _rotary(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``[P, head_dim]``: (row, col) frequencies, concatenated, then doubled."""
        freqs = position_ids[..., None].float() * self.inv_freq  # [P, 2, d/4]
        freqs = freqs.reshape(freqs.shape[0], -1)                # [P, d/2] = [row | col]
        emb = torch.cat((freqs, freqs), dim=-1)                  # [P, d]
        return emb.cos()[None], emb.sin()[None]                  # [1, P, d] (broadcast heads)

    @staticmethod
    def _bias(mask: torch.Tensor) -> torch.Tensor:
        """Additive bias from a boolean mask; finite (a fully masked row must not give NaN)."""
        return torch.where(mask, 0.0, torch.finfo(torch.float32).min)

    def forward(self, pixel_values, vision_position_ids, window_index,
                window_attention_mask, full_attention_mask):
        x = self._to_windows(self.patch_embed(pixel_values), window_index)  # [P, D]
        cos, sin = self._rotary(self._to_windows(vision_position_ids, window_index))
        window_bias = self._bias(window_attention_mask)
        full_bias = self._bias(full_attention_mask)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, full_bias if i in self.full_attention else window_bias)
        merged = self.merger(x)                                          # [M, out], windowed
        return torch.zeros_like(merged).index_copy(0, window_index, merged)  # original order


@register
class Qwen25VLExport(FamilyExport):
    model_type = Qwen25VLGlue.model_type
    hf_class = "Qwen2_5_VLForConditionalGeneration"

    def vision_module(self) -> nn.Module:
        return Qwen25VLVision(self.model.model.visual).eval()
