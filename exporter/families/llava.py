"""Export adapters of LLaVA-1.5 and LLaVA-NeXT: CLIP tower + feature select + projector."""
from __future__ import annotations

import torch

from .base import FamilyExport, register


class TileVision(torch.nn.Module):
    """``pixel_values [tiles, 3, S, S] -> image_features [tiles, P, H]``.

    The per-tile part of LLaVA's ``get_image_features``; LLaVA-NeXT's anyres packing
    (unpad, newline) is data dependent and runs on the host (``LlavaNextGlue``).
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        config = model.config
        self.tower = model.model.vision_tower
        self.projector = model.model.multi_modal_projector
        self.layers = config.vision_feature_layer
        self.drop_cls = config.vision_feature_select_strategy == "default"

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.tower(pixel_values, output_hidden_states=True).hidden_states
        layers = [self.layers] if isinstance(self.layers, int) else list(self.layers)
        feats = torch.cat([hidden[i] for i in layers], dim=-1)  # [tiles, 1+P, C]
        if self.drop_cls:
            feats = feats[:, 1:]
        return self.projector(feats)


@register
class LlavaExport(FamilyExport):
    model_type = "llava"
    hf_class = "LlavaForConditionalGeneration"

    def vision_module(self) -> torch.nn.Module:
        return TileVision(self.model)


@register
class LlavaNextExport(LlavaExport):
    model_type = "llava_next"
    hf_class = "LlavaNextForConditionalGeneration"
