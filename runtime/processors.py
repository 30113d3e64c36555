"""Load a model family's Hugging Face processor from a local directory, without torch.

Each family's glue names its processor class; call the processor with
``return_tensors="np"``: the runtime has no torch.
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import ManifestError, ModelDirError
from .families import glue_for
from .manifest import PROCESSOR_DIR
from .model_dir import read_config

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")  # fast, sentencepiece, BPE


def load_processor(model_dir: str | os.PathLike):
    """The family's processor, loaded from ``model_dir`` only (never the network); a clear
    error for a missing or corrupt tokenizer or processor file, or no chat template."""
    model_dir = Path(model_dir)
    glue = glue_for(read_config(model_dir))
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        raise ModelDirError(f"{model_dir} has no tokenizer (none of {', '.join(TOKENIZER_FILES)})."
                            f" Hint: copy the tokenizer files released with the model into it")
    try:
        processor = glue.processor_class().from_pretrained(os.fspath(model_dir),
                                                           local_files_only=True)
    except Exception as e:  # tokenizers raises a plain Exception for a malformed file
        cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelDirError(f"cannot load the tokenizer or processor in {model_dir}: {cause}. "
                            f"Hint: copy the model's tokenizer and processor files again") from e
    if not processor.chat_template:
        raise ModelDirError(f"{model_dir} has no chat template (chat_template.jinja or "
                            f"chat_template.json). Hint: copy the one released with the model "
                            f"into it")
    return processor


def load_artifact_processor(artifact_dir: str | os.PathLike) -> tuple[dict, object]:
    """The model ``config.json`` and processor that export saved in ``artifact_dir``."""
    folder = Path(artifact_dir) / PROCESSOR_DIR
    try:
        return read_config(folder), load_processor(folder)
    except ModelDirError as e:
        what = str(e).split(" Hint: ")[0].rstrip(".")
        raise ManifestError(f"{what}. Hint: the artifact folder is incomplete or damaged: copy "
                            f"it again whole, or re-run `vispec-export export`") from e
