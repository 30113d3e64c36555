"""Load a model family's Hugging Face processor from a local directory, without torch.

Call the processor with ``return_tensors="np"``: the runtime has no torch.
"""

from __future__ import annotations

import json
import os
import pathlib

from transformers import LlavaNextProcessor, LlavaProcessor, Qwen2_5_VLProcessor


class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL processor with the video part left out.

    The stock class needs ``Qwen2VLVideoProcessor``, which requires torchvision; loading it without
    torchvision raises ImportError. A processor's parts are read from its ``__init__`` signature,
    so leaving ``video_processor`` out of it drops the video part from checks, loading and saving.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    def to_dict(self) -> dict:
        """Serialise under the official class name, as real checkpoints are."""
        return {**super().to_dict(), "processor_class": Qwen2_5_VLProcessor.__name__}


_PROCESSORS = {
    "llava": LlavaProcessor,
    "llava_next": LlavaNextProcessor,
    "qwen2_5_vl": ImageOnlyQwen2_5_VLProcessor,
}
SUPPORTED_MODEL_TYPES = tuple(_PROCESSORS)


def read_model_type(model_dir: str | os.PathLike) -> str:
    """Return ``model_type`` from ``model_dir/config.json``; ValueError if it cannot be read."""
    config_path = pathlib.Path(model_dir) / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{config_path} not found: pass a local Hugging Face model directory "
                         "(the folder holding config.json, the weights and the processor files).")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {config_path} ({err}); re-save the model or fix the file.") from err
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not isinstance(model_type, str):
        raise ValueError(f"{config_path} has no 'model_type' string; it is not a Hugging Face model config.")
    return model_type


def load_processor(model_dir: str | os.PathLike):
    """Return the family's processor loaded from ``model_dir`` only (never the network)."""
    model_type = read_model_type(model_dir)
    if model_type not in _PROCESSORS:
        raise ValueError(f"model_type {model_type!r} in {model_dir} is not supported; "
                         f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}.")
    return _PROCESSORS[model_type].from_pretrained(os.fspath(model_dir), local_files_only=True)
