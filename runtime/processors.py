"""Load a model family's Hugging Face processor from a local directory, without torch.

Call the processor with ``return_tensors="np"``: the runtime has no torch.
"""

from __future__ import annotations

import os

from transformers import LlavaNextProcessor, LlavaProcessor, Qwen2_5_VLProcessor

from .errors import ModelDirError
from .model_dir import read_config


class ProcessorError(ModelDirError, ValueError):
    """No processor for this directory: config.json missing or unreadable, or an unsupported model_type."""


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
    """Return ``model_type`` from ``model_dir/config.json``; ProcessorError if it cannot be read."""
    try:
        config = read_config(model_dir)
    except ModelDirError as err:
        raise ProcessorError(str(err)) from err
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not isinstance(model_type, str):
        raise ProcessorError(f"{model_dir}/config.json has no 'model_type' string: not a Hugging Face "
                             "model config. Hint: pass the folder that `save_pretrained` wrote")
    return model_type


def load_processor(model_dir: str | os.PathLike):
    """Return the family's processor loaded from ``model_dir`` only (never the network)."""
    model_type = read_model_type(model_dir)
    if model_type not in _PROCESSORS:
        raise ProcessorError(f"model_type {model_type!r} in {model_dir} is not supported. "
                             f"Hint: supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}")
    return _PROCESSORS[model_type].from_pretrained(os.fspath(model_dir), local_files_only=True)
