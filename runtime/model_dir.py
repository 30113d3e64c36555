"""Cheap checks of a local Hugging Face model directory, before any weight is loaded."""
from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import SafetensorError, safe_open

from .errors import ModelDirError

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


def not_a_folder(path: Path) -> str:
    """Why ``path`` is no folder: ``"does not exist"`` or ``"is a file, not a folder"``."""
    return "is a file, not a folder" if path.exists() else "does not exist"


def read_config(model_dir: str | os.PathLike) -> dict:
    """``config.json`` of a local model directory, with errors a user can act on."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelDirError(f"model directory {model_dir} {not_a_folder(model_dir)}. Hint: pass "
                            f"a local folder holding config.json and weights (no hub downloads "
                            f"here)")
    path = model_dir / "config.json"
    if not path.is_file():
        raise ModelDirError(f"{model_dir} has no config.json: not a Hugging Face model folder. "
                            f"Hint: pass the folder that `save_pretrained` wrote")
    try:
        config = json.loads(path.read_text())
    except ValueError as e:
        raise ModelDirError(f"{path} is not valid JSON ({e}). Hint: re-save the model") from e
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ModelDirError(f"{path} has no 'model_type' string: not a Hugging Face model "
                            f"config. Hint: pass the folder that `save_pretrained` wrote")
    return config


def check_weights(model_dir: str | os.PathLike) -> None:
    """Fail early when a model directory has no weight files, or a truncated or corrupt
    safetensors file (its header names more bytes than the file holds)."""
    model_dir = Path(model_dir)
    if not any(any(model_dir.glob(p)) for p in WEIGHT_PATTERNS):
        raise ModelDirError(f"{model_dir} has no weights ({' or '.join(WEIGHT_PATTERNS)}). "
                            f"Hint: copy the checkpoint files into the folder")
    for path in sorted(model_dir.glob("*.safetensors")):
        try:
            with safe_open(str(path), "numpy"):
                pass
        except (OSError, SafetensorError) as e:
            raise ModelDirError(f"{path} is truncated or corrupt ({e}). Hint: copy or "
                                f"download the checkpoint file again") from e
