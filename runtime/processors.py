"""Load a model family's Hugging Face processor from a local directory, without torch.

Each family's glue names its processor class; call the processor with
``return_tensors="np"``: the runtime has no torch.
"""
from __future__ import annotations

import os

from .families import glue_for
from .model_dir import read_config


def load_processor(model_dir: str | os.PathLike):
    """The family's processor, loaded from ``model_dir`` only (never the network)."""
    glue = glue_for(read_config(model_dir))
    return glue.processor_class().from_pretrained(os.fspath(model_dir), local_files_only=True)
