"""Load a target VLM from a local directory (float32, eval), after cheap checks."""
from __future__ import annotations

import os
from pathlib import Path

import torch
import transformers
from safetensors import safe_open

from vispec.runtime.errors import ModelDirError
from vispec.runtime.families import FamilyGlue, glue_for
from vispec.runtime.model_dir import check_weights, read_config

from .families import FamilyExport, export_adapter

DTYPES = {"float32": torch.float32, "float16": torch.float16}


def load_target(model_dir: str | os.PathLike,
                dtype: str = "float32") -> tuple[FamilyExport, FamilyGlue]:
    """The family's export adapter (holding the loaded HF model) and its host glue.

    The language model and LM head load in ``dtype`` (float16 halves the memory a 7B
    export needs); everything else (vision tower, projector) is float32, and so are the
    rotary frequency tables, which transformers keeps in float32.
    """
    config = read_config(model_dir)
    glue = glue_for(config)
    adapter_cls = export_adapter(glue.model_type)
    check_weights(model_dir)
    hf_class = getattr(transformers, adapter_cls.hf_class)
    try:
        model = hf_class.from_pretrained(str(model_dir), local_files_only=True,
                                         dtype=DTYPES[dtype]).eval()
    except (OSError, RuntimeError) as e:  # unreadable checkpoint, weights not matching config
        raise ModelDirError(f"cannot load the model in {model_dir} ({type(e).__name__}: "
                            f"{str(e)[:300]}). Hint: check that the checkpoint files are "
                            f"complete and belong to its config.json") from e
    for name, child in model.model.named_children():
        if name != "language_model":
            child.float()
    for param in model.model.parameters(recurse=False):  # e.g. LLaVA-NeXT's image_newline
        param.data = param.data.float()
    return adapter_cls(model), glue


def read_text_weight(model_dir: str | os.PathLike, suffix: str) -> torch.Tensor:
    """One language-model weight (``lm_head.weight``, ``embed_tokens.weight``) read alone
    from the checkpoint files (float32), without loading the model: a drafter needs the
    target's LM head and embeddings, not a 7B model in memory.

    A missing ``lm_head.weight`` with ``tie_word_embeddings`` means the embeddings.
    """
    model_dir = Path(model_dir)
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            key = next((k for k in f.keys() if k.endswith(suffix)), None)
            if key is not None:
                return f.get_tensor(key).float()
    for path in sorted(model_dir.glob("pytorch_model*.bin")):
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        key = next((k for k in state if k.endswith(suffix)), None)
        if key is not None:
            return state[key].float()
    config = read_config(model_dir)
    tied = config.get("tie_word_embeddings", config.get("text_config", {}).get("tie_word_embeddings"))
    if suffix == "lm_head.weight" and tied:
        return read_text_weight(model_dir, "embed_tokens.weight")
    raise ModelDirError(f"{model_dir} has no weight named *{suffix}. Hint: use the model's "
                        f"original checkpoint files")
