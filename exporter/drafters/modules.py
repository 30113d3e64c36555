"""PyTorch drafters (EAGLE, ViSpec, HiViS) whose parameter names are the official checkpoint keys,
and the two exportable graphs over them (draft, adaptor).

    draft   : (ids [1,S], e [1,S,H], f [1,S,H], positions [1,S], mask [1,1,S,P+S], scored
               rows [R], past K/V, g [1,S,H] | residual index [1]) -> hidden, top-k of the
               scored rows, new K/V
    adaptor : (ViSpec) image embeddings [N,H] -> [num_q,H]
"""
from __future__ import annotations

import math
from typing import ClassVar

import torch
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding

from vispec.runtime.drafter_specs import FUSED_ROW

from ..lm_step import attend, mask_to_bias
from .config import DrafterConfig

_KINDS: dict[str, type["Drafter"]] = {}


def register(cls: type["Drafter"]) -> type["Drafter"]:
    """Class decorator: make a drafter kind buildable by name."""
    _KINDS[cls.kind] = cls
    return cls


def build_drafter(config: DrafterConfig) -> "Drafter":
    """An (uninitialised) drafter module of ``config.kind``."""
    return _KINDS[config.kind](config)


class DrafterAttention(torch.nn.Module):
    """q/k/v/o projections in the layout :func:`lm_step.attend` reads."""

    def __init__(self, c: DrafterConfig):
        super().__init__()
        self.head_dim = c.head_dim
        self.scaling = c.head_dim ** -0.5
        self.q_proj = torch.nn.Linear(c.hidden_size, c.num_heads * c.head_dim, bias=c.qkv_bias)
        self.k_proj = torch.nn.Linear(c.hidden_size, c.kv_heads * c.head_dim, bias=c.qkv_bias)
        self.v_proj = torch.nn.Linear(c.hidden_size, c.kv_heads * c.head_dim, bias=c.qkv_bias)
        self.o_proj = torch.nn.Linear(c.num_heads * c.head_dim, c.hidden_size, bias=False)


class DrafterLayer(torch.nn.Module):
    """The drafter's decoder layer: no input norm; fp32 RMSNorm before the SiLU MLP."""

    def __init__(self, c: DrafterConfig):
        super().__init__()
        self.self_attn = DrafterAttention(c)
        self.mlp = LlamaMLP(c.llama_config())
        self.post_attention_layernorm = LlamaRMSNorm(c.hidden_size, eps=c.rms_norm_eps)

    def forward(self, x, cos, sin, bias, past_k, past_v):
        """``x [1,S,H]`` -> (``[1,S,H]``, new K, new V ``[1,S,kvh,hd]``)."""
        a, k, v = attend(self.self_attn, x, cos, sin, bias, past_k, past_v)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), k, v


class ImageAdaptor(torch.nn.Module):
    """ViSpec's ``imadpt``: ``num_q`` learned queries attend (non-causally) over one image."""

    def __init__(self, c: DrafterConfig):
        super().__init__()
        self.num_heads, self.head_dim = c.num_heads, c.hidden_size // c.num_heads
        width = self.num_heads * self.head_dim
        self.q = torch.nn.Parameter(torch.randn(c.num_q, self.num_heads, self.head_dim)
                                    * self.head_dim ** -0.5)
        self.k_proj = torch.nn.Linear(c.hidden_size, width, bias=c.qkv_bias)
        self.v_proj = torch.nn.Linear(c.hidden_size, width, bias=c.qkv_bias)
        self.o_proj = torch.nn.Linear(width, c.hidden_size, bias=False)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """``[N, H]`` -> ``[num_q, H]``."""
        n = image_embeds.shape[0]
        k = self.k_proj(image_embeds).view(n, self.num_heads, self.head_dim).transpose(0, 1)
        v = self.v_proj(image_embeds).view(n, self.num_heads, self.head_dim).transpose(0, 1)
        q = self.q.transpose(0, 1)  # [heads, num_q, hd]
        probs = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(self.head_dim), dim=-1)
        out = (probs @ v).transpose(0, 1).reshape(self.q.shape[0], -1)  # [num_q, heads*hd]
        return self.o_proj(out)


class Drafter(torch.nn.Module):
    """Shared parts of every drafter, with ``fc`` fusing ``fc_inputs`` rows of ``[1,S,H]``
    into one; subclasses add their other fusion parameters and ``fuse``.

    ``state_dict()`` keys are exactly the official checkpoint's. The LM head is the target's
    and is not part of the drafter (see :class:`DraftGraph`).
    """

    kind: str
    fc_inputs: ClassVar[int] = 2  # rows concatenated into ``fc``: e and f (or f fused with g)

    def __init__(self, c: DrafterConfig):
        super().__init__()
        self.config = c
        self.embed_tokens = torch.nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = torch.nn.ModuleList([DrafterLayer(c)])
        self.rotary = LlamaRotaryEmbedding(c.llama_config())
        self.fc = torch.nn.Linear(self.fc_inputs * c.hidden_size, c.hidden_size, bias=c.fc_bias)

    def fuse(self, embeds: torch.Tensor, features: torch.Tensor, extra: torch.Tensor):
        """Decoder-layer input rows ``[1,S,H]`` from ``e``, ``f`` and the kind's extra input."""
        raise NotImplementedError

    def level_extra(self, level: int, global_feature: torch.Tensor | None):
        """The kind's extra ``fuse`` input for the rows of tree level ``level`` (0: the
        committed rows), with ``global_feature`` the latest image's (ViSpec)."""
        return None

    def layer(self, fused, positions, mask, past_k, past_v):
        """Run the decoder layer over ``fused [1,S,H]`` at ``positions [1,S]`` with a bool
        ``mask [1,1,S,P+S]`` over the past ``[1,P,kvh,hd]`` and the new rows."""
        cos, sin = self.rotary(fused, positions)
        return self.layers[0](fused, cos, sin, mask_to_bias(mask, fused.dtype), past_k, past_v)


@register
class EagleDrafter(Drafter):
    """EAGLE-2: ``fc(cat(e, f))``."""

    kind = "eagle"

    def fuse(self, embeds, features, extra=None):
        return self.fc(torch.cat([embeds, features], dim=-1))


@register
class VispecDrafter(Drafter):
    """ViSpec: ``fc(cat(e, img_fc(cat(f, g))))`` with the latest image's global feature g."""

    kind = "vispec"

    def __init__(self, c: DrafterConfig):
        super().__init__(c)
        h = c.hidden_size
        self.img_fc = torch.nn.Linear(2 * h, h, bias=c.fc_bias)
        self.imadpt = ImageAdaptor(c)
        with torch.no_grad():  # a new drafter starts as EAGLE: img_fc passes f through
            self.img_fc.weight.zero_()
            self.img_fc.weight[:, :h].copy_(torch.eye(h))
            if self.img_fc.bias is not None:
                self.img_fc.bias.zero_()

    def level_extra(self, level, global_feature):
        return global_feature

    def fuse(self, embeds, features, global_feature):
        """``global_feature``: one g ``[B, H]`` for every row, or one a row ``[B, S, H]``."""
        g = global_feature if global_feature.dim() == features.dim() else \
            global_feature[:, None].expand_as(features)
        return self.fc(torch.cat([embeds, self.img_fc(torch.cat([features, g], dim=-1))], -1))


@register
class HivisDrafter(Drafter):
    """HiViS: ``fc(cat(e, f, residual[k]))``, ``k`` picked per call."""

    kind = "hivis"
    fc_inputs = 3  # e, f and the residual row

    def __init__(self, c: DrafterConfig):
        super().__init__(c)
        self.residual = torch.nn.Parameter(torch.zeros(c.residual_rows, c.hidden_size))

    def level_extra(self, level, global_feature):
        return torch.tensor([min(level, self.config.residual_rows - 1)])

    def fuse(self, embeds, features, residual_index):
        r = self.residual.index_select(0, residual_index)[:, None].expand_as(features)
        return self.fc(torch.cat([embeds, features, r], dim=-1))


# -- exportable graphs ---------------------------------------------------------------------
class DraftGraph(torch.nn.Module):
    """``(input_ids, inputs_embeds, features, position_ids, attention_mask, logit_rows,
    past_key.0, past_value.0[, global_feature | residual_index]) -> (hidden_states,
    topk_logprobs, topk_ids, present_key.0, present_value.0)`` (``drafter_specs.draft_spec``;
    the head and top-k on ``logit_rows`` only).

    Row embeddings: the drafter's table for ids >= 0, ``inputs_embeds`` for ``EMBEDDED``;
    ``FUSED_ROW`` rows skip the fusion. With ``draft_ids`` (a draft vocabulary) only those
    LM-head rows are scored and the top-k indices are mapped back to target ids in the graph.
    """

    def __init__(self, drafter: Drafter, lm_head_weight: torch.Tensor, top_k: int,
                 draft_ids: torch.Tensor | None = None):
        super().__init__()
        self.drafter = drafter
        if draft_ids is not None:
            lm_head_weight = lm_head_weight[draft_ids]
            self.register_buffer("d2t", draft_ids.long())
        else:
            self.d2t = None
        self.lm_head = torch.nn.Linear(lm_head_weight.shape[1], lm_head_weight.shape[0],
                                       bias=False)
        with torch.no_grad():
            self.lm_head.weight.copy_(lm_head_weight)
        self.top_k = top_k

    def forward(self, input_ids, inputs_embeds, features, position_ids, attention_mask,
                logit_rows, past_k, past_v, extra=None):
        tokens = self.drafter.embed_tokens(input_ids.clamp(min=0))
        embeds = torch.where((input_ids >= 0)[..., None], tokens, inputs_embeds)
        fused = self.drafter.fuse(embeds, features, extra)
        fused = torch.where((input_ids == FUSED_ROW)[..., None], inputs_embeds, fused)
        hidden, k, v = self.drafter.layer(fused, position_ids, attention_mask, past_k, past_v)
        scored = hidden.index_select(1, logit_rows)  # [1, rows, H]
        logp = torch.log_softmax(self.lm_head(scored).float(), dim=-1)  # [1,rows,V or N]
        top = torch.topk(logp, self.top_k, dim=-1)
        ids = top.indices if self.d2t is None else self.d2t[top.indices]
        return hidden, top.values, ids, k, v


class AdaptorGraph(torch.nn.Module):
    """``image_embeds [N,H] -> adaptor_rows [num_q,H]``."""

    def __init__(self, drafter: VispecDrafter):
        super().__init__()
        self.imadpt = drafter.imadpt

    def forward(self, image_embeds):
        return self.imadpt(image_embeds)
