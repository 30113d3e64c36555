"""Load a target VLM from a local directory (float32, eval), after cheap checks."""
from __future__ import annotations

import os

import torch
import transformers

from vispec.runtime.families import FamilyGlue, glue_for
from vispec.runtime.model_dir import check_weights, read_config

from .families import FamilyExport, export_adapter


def load_target(model_dir: str | os.PathLike) -> tuple[FamilyExport, FamilyGlue]:
    """The family's export adapter (holding the loaded HF model) and its host glue."""
    config = read_config(model_dir)
    glue = glue_for(config)
    adapter_cls = export_adapter(glue.model_type)
    check_weights(model_dir)
    hf_class = getattr(transformers, adapter_cls.hf_class)
    model = hf_class.from_pretrained(str(model_dir), local_files_only=True,
                                     dtype=torch.float32).eval()
    return adapter_cls(model), glue
