"""Tiny random-initialised vision-language models saved as real local Hugging Face directories.

Each directory holds config.json, model.safetensors, generation_config.json, a locally trained
byte-level BPE tokenizer and the family's processor files with a chat template, so that
``from_pretrained(dir)`` is exactly the code path real checkpoints take.

Pitfalls of real checkpoints built in on purpose:
- every text config states ``head_dim``; for "llava_next" (Mistral-style) it differs from
  hidden_size / num_attention_heads;
- "llava_next" and "qwen2_5_vl" have a config vocab larger than the tokenizer's (padded rows),
  and so does every family in the "100m" preset (config vocab 4096);
- "qwen2_5_vl" has M-RoPE, qkv biases and a windowed vision tower with full-attention blocks.
"""

from __future__ import annotations

import math
import os
import pathlib
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaProcessor,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
)

from vispec.runtime.families.qwen2_5_vl import image_only_processor_class

FAMILIES = ("llava", "llava_next", "qwen2_5_vl")

# Text-model sizes per preset; the vision towers stay tiny in every preset.
_PRESETS = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, intermediate_size=128, min_vocab=0),
    "100m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                 head_dim=64, intermediate_size=2560, min_vocab=4096),
}
_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
_PATCH = 14
_HEAD_DIM_FACTOR = {"llava_next": 2}  # Mistral-style: head_dim != hidden_size / num_attention_heads
_INIT_GAIN = 1.5  # random logits far from ties (HF's std 0.02 gives ~1e-3 top-1/top-2 gaps)
_TOKENIZER_VOCAB = 480

_CORPUS = """\
A small red boat floats on the calm blue lake while two children watch from the green shore.
The old man in the picture holds a yellow umbrella and walks slowly along the wet street.
There is a black cat sitting on the wooden table next to a white cup of hot coffee.
In this image we can see a tall building with many windows, a bright sky and a few clouds.
The dog runs across the field to catch the ball that the girl has thrown into the air.
Describe the image in detail. What colour is the car? How many people are in the photo?
The answer is that the car is blue and there are three people standing near the door.
A woman is reading a book under a large tree in the park on a sunny summer afternoon.
The kitchen has a stove, a sink, a refrigerator and a basket of fresh fruit on the counter.
Two birds are sitting on a branch; one of them is singing and the other is looking down.
The train arrives at the station at eight o'clock and leaves again ten minutes later.
On the left side of the picture there is a mountain covered with snow and dark forests.
The street is full of shops, bicycles and people who are walking home after work.
A plate of pasta with tomato sauce and cheese is served with a glass of orange juice.
The computer screen shows a chart with numbers, lines and a title written in bold letters.
The horse is standing in the barn, eating hay, while the farmer repairs the fence outside.
It is raining in the city, and the lights of the cars are reflected on the dark road.
The boy wears a striped shirt, short trousers and a pair of new shoes for the first day of school.
Please answer the question about the image with a short and clear sentence.
The photograph was taken at night, so the colours are dark and the stars are visible above.
A group of friends is sitting around a fire on the beach, talking and laughing together.
The sign on the wall says that the museum opens at nine in the morning and closes at five.
There are four apples, three oranges and one banana in the bowl on the kitchen table.
The airplane is flying high above the clouds, and the sun is shining on its silver wings.
The flowers in the garden are red, yellow, purple and white, and a bee is flying between them.
The picture shows a quiet village with small houses, narrow roads and a church in the centre.
"""

_LLAVA_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | upper }}: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% if m['role'] == 'assistant' %}</s>{% endif %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

_QWEN_TEMPLATE = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class _TokenSpec:
    """Special tokens of a family (ids follow list order, starting at 0) and its chat template."""

    specials: tuple[str, ...]
    unk: str | None
    bos: str | None
    eos: tuple[str, ...]
    pad: str
    image: str
    chat_template: str
    vocab_multiple: int  # config vocab is the tokenizer size rounded up to this (padded rows)


_LLAVA_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")
_QWEN_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
_TOKEN_SPECS = {
    "llava": _TokenSpec(_LLAVA_TOKENS, "<unk>", "<s>", ("</s>",), "<pad>", "<image>", _LLAVA_TEMPLATE, 1),
    "llava_next": _TokenSpec(_LLAVA_TOKENS, "<unk>", "<s>", ("</s>",), "<pad>", "<image>", _LLAVA_TEMPLATE, 64),
    "qwen2_5_vl": _TokenSpec(_QWEN_TOKENS, None, None, ("<|im_end|>", "<|endoftext|>"), "<|endoftext|>",
                             "<|image_pad|>", _QWEN_TEMPLATE, 64),
}


def _train_tokenizer(spec: _TokenSpec) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on the embedded corpus; specials get ids 0..n-1, bos is prepended."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=_TOKENIZER_VOCAB, special_tokens=list(spec.specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    byte_level = processors.ByteLevel(trim_offsets=False)
    if spec.bos is None:
        tok.post_processor = byte_level
    else:
        bos = (spec.bos, tok.token_to_id(spec.bos))
        template = processors.TemplateProcessing(single=f"{spec.bos} $A", pair=f"{spec.bos} $A {spec.bos} $B",
                                                 special_tokens=[bos])
        tok.post_processor = processors.Sequence([byte_level, template])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=spec.bos, eos_token=spec.eos[0], pad_token=spec.pad,
        unk_token=spec.unk,
        extra_special_tokens=[t for t in spec.specials if t not in (spec.unk, spec.bos, spec.eos[0], spec.pad)],
        chat_template=spec.chat_template, clean_up_tokenization_spaces=False)


def _config_vocab(tokenizer, spec: _TokenSpec, preset: dict) -> int:
    size = max(len(tokenizer), preset["min_vocab"])
    return -(-size // spec.vocab_multiple) * spec.vocab_multiple


def _token_ids(tokenizer, spec: _TokenSpec) -> dict:
    """The token-id fields every family's text config and generation config state."""
    eos = [tokenizer.convert_tokens_to_ids(t) for t in spec.eos]
    return dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=eos if len(eos) > 1 else eos[0],
                pad_token_id=tokenizer.pad_token_id)


def _text_dims(family: str, tokenizer, spec: _TokenSpec, preset: dict, text: dict) -> dict:
    """Text-config fields: the preset's sizes (head_dim scaled per family), then ``text``."""
    dims = {k: v for k, v in preset.items() if k != "min_vocab"}
    dims["head_dim"] *= _HEAD_DIM_FACTOR.get(family, 1)
    dims = dict(dims, vocab_size=_config_vocab(tokenizer, spec, preset), max_position_embeddings=4096)
    dims.update(text)
    if dims["vocab_size"] < len(tokenizer):
        raise ValueError(f"vocab_size {dims['vocab_size']} < the tokenizer's {len(tokenizer)} tokens")
    return dims


def _clip_vision(image_size: int) -> CLIPVisionConfig:
    return CLIPVisionConfig(**_VISION, image_size=image_size, patch_size=_PATCH, projection_dim=32)


def _llava(tokenizer, spec, dims):
    """LLaVA-1.5 layout: 56x56 CLIP input (4x4 patches + CLS), llama text model, 16 image tokens."""
    image_size = 56
    text = LlamaConfig(**dims, **_token_ids(tokenizer, spec))
    config = LlavaConfig(vision_config=_clip_vision(image_size), text_config=text,
                         image_token_id=tokenizer.convert_tokens_to_ids(spec.image),
                         image_seq_length=(image_size // _PATCH) ** 2, vision_feature_select_strategy="default",
                         vision_feature_layer=-2)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                            crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=_PATCH,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=spec.chat_template, image_token=spec.image)
    return LlavaForConditionalGeneration, config, processor


def _llava_next(tokenizer, spec, dims):
    """LLaVA-1.6 layout: anyres tiles of 28x28 (2x2 patches), Mistral text model with head_dim 2x usual."""
    image_size = 28
    pinpoints = [[28, 28], [28, 56], [56, 28], [56, 56]]
    text = MistralConfig(**dims, sliding_window=None, **_token_ids(tokenizer, spec))
    config = LlavaNextConfig(vision_config=_clip_vision(image_size), text_config=text,
                             image_token_id=tokenizer.convert_tokens_to_ids(spec.image),
                             image_grid_pinpoints=pinpoints, image_seq_length=(image_size // _PATCH) ** 2,
                             vision_feature_select_strategy="default", vision_feature_layer=-2)
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": image_size},
                                                 crop_size={"height": image_size, "width": image_size},
                                                 image_grid_pinpoints=pinpoints)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=_PATCH,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=spec.chat_template, image_token=spec.image)
    return LlavaNextForConditionalGeneration, config, processor


def _qwen2_5_vl(tokenizer, spec, dims):
    """Qwen2.5-VL layout: 14px patches merged 2x2, 28px attention windows, M-RoPE split 16:24:24 as in 7B."""
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    half = dims["head_dim"] // 2
    mrope = [half // 4, half * 3 // 8, half - half // 4 - half * 3 // 8]  # real ratio 16:24:24
    text = dict(dims, **_token_ids(tokenizer, spec),
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": mrope})
    vision = dict(depth=_VISION["num_hidden_layers"], hidden_size=_VISION["hidden_size"],
                  intermediate_size=_VISION["intermediate_size"], num_heads=_VISION["num_attention_heads"],
                  out_hidden_size=dims["hidden_size"], patch_size=_PATCH, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=_PATCH,
                                               merge_size=2, temporal_patch_size=2)
    processor = image_only_processor_class()(image_processor=image_processor, tokenizer=tokenizer,
                                               chat_template=spec.chat_template)
    return Qwen2_5_VLForConditionalGeneration, config, processor


_BUILDERS = {"llava": _llava, "llava_next": _llava_next, "qwen2_5_vl": _qwen2_5_vl}


@torch.no_grad()
def _init_weights(model: torch.nn.Module, gain: float) -> None:
    """Redraw linear/conv weights and biases from N(0, gain^2 / fan_in) and embeddings from N(0, 1).

    Fan-in scaling keeps activations O(1) at any width (no fp16 overflow in the 100m preset) while
    the gain keeps random logits apart; norm scales keep their init.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            module.weight.normal_(0.0, 1.0)
        elif isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv3d)):
            std = gain / math.sqrt(module.weight[0].numel())
            for param in module.parameters(recurse=False):
                param.normal_(0.0, std)


@torch.no_grad()
def _twin_head_rows(model: torch.nn.Module, gap: float) -> None:
    """Near-ties: in the first half of the vocabulary every odd LM-head row becomes its even
    neighbour scaled by ``1 + gap``, so those token pairs' logits differ by ``gap`` of their
    size, within reach of a kernel's rounding."""
    head = model.get_output_embeddings().weight  # [V, H]
    pairs = head.shape[0] // 4 * 2
    head[1:pairs:2] = head[0:pairs:2] * (1 + gap)


def build_tiny_model(family: str, out_dir: str | os.PathLike, *, seed: int = 0, preset: str = "tiny",
                     text: Mapping[str, Any] | None = None,
                     dtype: torch.dtype = torch.float32, tie_gap: float | None = None) -> pathlib.Path:
    """Build a random-initialised model of ``family`` and save it as a local HF directory.

    ``text`` overrides text-config fields of the preset (``hidden_size``, ``head_dim``,
    ``num_key_value_heads``, ``vocab_size`` >= the tokenizer's, ``tie_word_embeddings``, ...):
    models of any shape for property tests and benchmarks at real sizes (saved in ``dtype``).
    ``tie_gap``: make token pairs whose logits nearly tie (``_twin_head_rows``), for tests of
    the exactness contract's tie clause. Returns the directory. Deterministic for a given
    ``seed``; "tiny" weights are < 1 MB.
    """
    if family not in _BUILDERS:
        raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")
    if preset not in _PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {tuple(_PRESETS)}")
    spec = _TOKEN_SPECS[family]
    tokenizer = _train_tokenizer(spec)
    dims = _text_dims(family, tokenizer, spec, _PRESETS[preset], dict(text or {}))
    model_cls, config, processor = _BUILDERS[family](tokenizer, spec, dims)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    _init_weights(model, _INIT_GAIN)
    if tie_gap is not None:
        _twin_head_rows(model, tie_gap)
    model.to(dtype)
    model.generation_config = GenerationConfig(do_sample=False, **_token_ids(tokenizer, spec))
    out = pathlib.Path(out_dir)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
