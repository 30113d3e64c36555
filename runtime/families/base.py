"""Host-side glue of a model family: chat template, preprocessing, image placement, positions,
and the family's rules the drafters follow (which rows HiViS keeps).

One subclass per family, registered with :func:`register`. The PyTorch reference and the
runtime both call it, so both see exactly the same tokens, pixels and positions.
No torch here: the runtime must run without it.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from ..errors import ModelDirError, VispecError
from ..specs import GraphSpec

_REGISTRY: dict[str, type["FamilyGlue"]] = {}


def register(cls: type["FamilyGlue"]) -> type["FamilyGlue"]:
    """Class decorator: make a family's glue findable by its HF ``model_type``."""
    _REGISTRY[cls.model_type] = cls
    return cls


def glue_for(config: dict) -> "FamilyGlue":
    """The glue for an HF ``config.json`` dict; a clear error for unsupported families."""
    model_type = config.get("model_type")
    if model_type not in _REGISTRY:
        raise ModelDirError(f"unsupported architecture model_type={model_type!r}. Supported: "
                            f"{sorted(_REGISTRY)} (LLaVA-1.5, LLaVA-1.6, Qwen2.5-VL)")
    return _REGISTRY[model_type](config)


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def runs(values: np.ndarray) -> list[tuple[int, int, int]]:
    """``(value, start, end)`` of every maximal run of equal values in ``values [L]``."""
    values = np.asarray(values)
    starts = np.flatnonzero(np.diff(values, prepend=values[:1] - 1) != 0) if len(values) else []
    ends = np.append(starts[1:], len(values)) if len(values) else []
    return [(int(values[s]), int(s), int(e)) for s, e in zip(starts, ends)]


def image_runs(is_image: np.ndarray) -> list[tuple[int, int]]:
    """``[start, end)`` of every maximal run of True in ``is_image [L]``."""
    return [(start, end) for value, start, end in runs(np.asarray(is_image).astype(np.int8))
            if value]


@dataclass
class Prompt:
    """A tokenised prompt with its preprocessed images."""

    input_ids: np.ndarray                 # [L] int64
    processed: dict = field(default_factory=dict)  # the processor's other outputs (np)
    images: tuple[str, ...] = ()          # fingerprints of the images, in placeholder order

    @property
    def has_images(self) -> bool:
        return "pixel_values" in self.processed


def image_key(image) -> str:
    """A fingerprint of a PIL image's pixels (what tells two images with equal tokens apart)."""
    digest = hashlib.blake2b(f"{image.mode}{image.size}".encode(), digest_size=16)
    digest.update(image.tobytes())
    return digest.hexdigest()


class FamilyGlue:
    """Base glue; subclasses set ``model_type`` and implement the vision-specific parts."""

    model_type: ClassVar[str]
    processor_name: ClassVar[str]  # the HF processor class (tokenizer + image processor)
    mrope: ClassVar[bool] = False

    def __init__(self, config: dict):
        self.config = config
        self.text_config = config.get("text_config", config)

    # -- facts read from the config (never derived when the config states them) ---------
    @property
    def image_token_id(self) -> int:
        """The image placeholder id (LLaVA configs call it ``image_token_index``)."""
        for key in ("image_token_id", "image_token_index"):
            if key in self.config:
                return int(self.config[key])
        raise ModelDirError("config.json names no image_token_id / image_token_index. "
                            "Hint: use the model's original config.json")

    @property
    def hidden_size(self) -> int:
        return int(self.text_config["hidden_size"])

    # -- prompt ---------------------------------------------------------------------------
    @classmethod
    def processor_class(cls) -> type:
        """The HF processor class, imported only when a processor is loaded (transformers'
        processing modules are slow to import)."""
        import transformers
        return getattr(transformers, cls.processor_name)

    def prepare(self, processor, text: str, images: list | None = None) -> Prompt:
        """Apply the chat template and the processor to one user turn with images."""
        placeholder = processor.tokenizer.convert_ids_to_tokens(self.image_token_id)
        if placeholder in text:
            raise VispecError(f"the prompt contains {placeholder!r}, the model's image "
                              f"placeholder. Hint: leave it out of the text and pass each "
                              f"picture as an image (--image); the chat template places it")
        images = list(images or [])
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
        return self.prepare_chat(processor, [{"role": "user", "content": content}], images)

    def prepare_chat(self, processor, messages: list[dict], images: list | None = None) -> Prompt:
        """Apply the chat template and the processor to a conversation (HF message dicts;
        ``{"type": "image"}`` parts take ``images`` in order), ready for the reply."""
        images = list(images or [])
        chat = processor.apply_chat_template(messages, add_generation_prompt=True,
                                             tokenize=False)
        out = dict(processor(text=[chat], images=images or None, return_tensors="np"))
        input_ids = np.asarray(out.pop("input_ids"))[0].astype(np.int64)
        out.pop("attention_mask", None)
        return Prompt(input_ids=input_ids, processed=out,
                      images=tuple(image_key(i) for i in images))

    def image_slots(self, prompt: Prompt) -> list[int]:
        """The first placeholder slot of each run of image tokens (one run per image where
        the template separates images, as every supported family's does)."""
        return [start for start, _ in image_runs(prompt.input_ids == self.image_token_id)]

    def tail(self, prompt: Prompt, start: int) -> Prompt:
        """The prompt from token ``start`` on with the inputs of the images placed there
        (``start`` must not cut an image's placeholders)."""
        first = sum(slot < start for slot in self.image_slots(prompt))
        images = self.images_from(prompt.processed, first) if prompt.has_images else {}
        return Prompt(prompt.input_ids[start:], images, prompt.images[first:])

    def images_from(self, processed: dict, first: int) -> dict:
        """The processor outputs of images ``first, first+1, ...`` (none left: {}); every
        output has one entry per image here."""
        if first >= len(processed["pixel_values"]):
            return {}
        return {name: value[first:] for name, value in processed.items()}

    # -- vision ---------------------------------------------------------------------------
    @classmethod
    def vision_spec(cls, config: dict, max_images: int) -> GraphSpec:
        """The vision graph's IO (vision tower + projector)."""
        raise NotImplementedError

    def vision_feeds(self, prompt: Prompt) -> dict[str, np.ndarray]:
        """Inputs of the vision graph for a prompt's images."""
        raise NotImplementedError

    def image_features(self, vision_out: np.ndarray, prompt: Prompt,
                       extras: dict[str, np.ndarray]) -> np.ndarray:
        """Image embeddings in placeholder order, ``[n_image_tokens, H]``.

        ``extras`` holds the host-side arrays saved at export (see ``extra_arrays``).
        """
        return vision_out.reshape(-1, vision_out.shape[-1])

    @staticmethod
    def extra_arrays(model) -> dict[str, np.ndarray]:
        """Host-side weights the glue needs at run time, taken from the HF model at export."""
        return {}

    def merge(self, embeds: np.ndarray, input_ids: np.ndarray,
              features: np.ndarray) -> np.ndarray:
        """Place image features at the image-token slots of ``embeds [L, H]`` (in place)."""
        slots = np.flatnonzero(input_ids == self.image_token_id)
        if len(slots) != len(features):
            raise VispecError(f"the prompt has {len(slots)} image tokens but the images gave "
                              f"{len(features)} features. Hint: use the model's own processor")
        embeds[slots] = features
        return embeds

    # -- drafters ------------------------------------------------------------------------
    def hivis_text_rows(self, input_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """HiViS's rule for this family: the indices of the prompt tokens ``input_ids [L]``
        it keeps (the image's tokens removed) ``[T]`` and the positions they take ``[T]``."""
        known = sorted(t for t, cls in _REGISTRY.items()
                       if cls.hivis_text_rows is not FamilyGlue.hivis_text_rows)
        raise VispecError(f"HiViS has no image layout for target family {self.model_type!r} "
                          f"(known: {known})")

    # -- positions ------------------------------------------------------------------------
    def position_ids(self, prompt: Prompt) -> tuple[np.ndarray, int]:
        """Prefill position ids (``[1, L]``, or ``[3, 1, L]`` with M-RoPE) and the next
        text position after the prompt."""
        n = len(prompt.input_ids)
        return np.arange(n, dtype=np.int64)[None], n

    def step_position_ids(self, start: int, offsets: np.ndarray) -> np.ndarray:
        """Position ids of new text tokens at ``start + offsets`` (decode or a tree)."""
        pos = (start + np.asarray(offsets, dtype=np.int64))[None]  # [1, S]
        return np.broadcast_to(pos, (3, 1, pos.shape[1])).copy() if self.mrope else pos
