"""Export-side family adapters: which HF class loads a family, and its vision module.

One small adapter per family, registered by decorator; the host-side glue it pairs with
lives in ``vispec.runtime.families`` (shared with the runtime).
"""
from __future__ import annotations

from typing import ClassVar

import torch

from vispec.runtime.errors import ModelDirError

_REGISTRY: dict[str, type["FamilyExport"]] = {}


def register(cls: type["FamilyExport"]) -> type["FamilyExport"]:
    """Class decorator: make a family's export adapter findable by its ``model_type``."""
    _REGISTRY[cls.model_type] = cls
    return cls


def export_adapter(model_type: str) -> type["FamilyExport"]:
    if model_type not in _REGISTRY:
        raise ModelDirError(f"unsupported architecture model_type={model_type!r}. Supported: "
                            f"{sorted(_REGISTRY)}")
    return _REGISTRY[model_type]


class FamilyExport:
    """Wraps a loaded HF ``…ForConditionalGeneration`` of one family for export."""

    model_type: ClassVar[str]
    hf_class: ClassVar[str]  # class name in ``transformers``

    def __init__(self, model: torch.nn.Module):
        self.model = model

    @property
    def language_model(self) -> torch.nn.Module:
        """The decoder stack (``embed_tokens``, ``layers``, ``norm``, ``rotary_emb``)."""
        return self.model.model.language_model

    @property
    def lm_head(self) -> torch.nn.Module:
        return self.model.lm_head

    def vision_module(self) -> torch.nn.Module:
        """A module whose ``forward`` takes the vision spec's inputs in order and returns
        the image features in the language model's input space (tower + projector)."""
        raise NotImplementedError
