"""The tiny model factory: real HF directories that reload, process images and generate."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import (
    AutoConfig,
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
    Qwen2_5_VLForConditionalGeneration,
)

from vispec.exporter.fixtures.models import FAMILIES, build_tiny_model
from vispec.runtime.processors import load_processor

MODEL_CLASSES = {
    "llava": LlavaForConditionalGeneration,
    "llava_next": LlavaNextForConditionalGeneration,
    "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
}
IMAGE_TOKENS_56X56 = {"llava": 16, "llava_next": 24, "qwen2_5_vl": 4}
MESSAGES_WITH_IMAGE = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
MESSAGES_TEXT_ONLY = [{"role": "user", "content": [{"type": "text", "text": "Describe the red boat."}]}]


@pytest.fixture(scope="module", params=FAMILIES)
def model_dir(request, tmp_path_factory):
    return build_tiny_model(request.param, tmp_path_factory.mktemp(request.param))


def _image(height=56, width=56, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _family(model_dir):
    return AutoConfig.from_pretrained(model_dir, local_files_only=True).model_type


def _prompt(processor, messages):
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _inputs(processor, messages, images):
    return processor(text=[_prompt(processor, messages)], images=images, return_tensors="np")


@pytest.mark.parametrize("messages,images", [(MESSAGES_WITH_IMAGE, [_image()]), (MESSAGES_TEXT_ONLY, None)],
                         ids=["image", "text"])
def test_reloads_processes_and_generates(model_dir, messages, images):
    family = _family(model_dir)
    model = MODEL_CLASSES[family].from_pretrained(model_dir, local_files_only=True).eval()
    inputs = _inputs(load_processor(model_dir), messages, images)
    n_image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert n_image_tokens == (IMAGE_TOKENS_56X56[family] if images else 0)

    prompt_len = inputs["input_ids"].shape[1]
    out = model.generate(**{k: torch.from_numpy(v) for k, v in inputs.items()},
                         max_new_tokens=8, do_sample=False, output_scores=True, return_dict_in_generate=True)
    assert out.sequences.shape[1] > prompt_len
    gaps = [float(top[0] - top[1]) for top in (torch.topk(s[0], 2).values for s in out.scores)]
    assert np.median(gaps) > 1e-2, f"random logits are near-ties: {gaps}"


def test_llava_next_token_count_depends_on_image_size(tmp_path):
    model_dir = build_tiny_model("llava_next", tmp_path)
    processor = load_processor(model_dir)
    model = LlavaNextForConditionalGeneration.from_pretrained(model_dir, local_files_only=True)
    counts = {}
    for size in [(56, 56), (28, 56), (40, 90), (28, 28)]:
        inputs = _inputs(processor, MESSAGES_WITH_IMAGE, [_image(*size)])
        counts[size] = int((inputs["input_ids"] == model.config.image_token_id).sum())
        with torch.no_grad():  # the model raises if the processor's count disagrees with its features
            model(**{k: torch.from_numpy(v) for k, v in inputs.items()})
    assert counts == {(56, 56): 24, (28, 56): 14, (40, 90): 14, (28, 28): 10}


def test_chat_templates(tmp_path):
    llava = load_processor(build_tiny_model("llava", tmp_path / "llava"))
    qwen = load_processor(build_tiny_model("qwen2_5_vl", tmp_path / "qwen"))
    assert _prompt(llava, MESSAGES_WITH_IMAGE) == "USER: <image>\nWhat is this? ASSISTANT:"
    assert _prompt(qwen, MESSAGES_WITH_IMAGE).endswith(
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is this?<|im_end|>\n<|im_start|>assistant\n")


def test_special_token_ids_match_config(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    generation = json.loads((model_dir / "generation_config.json").read_text())
    tokenizer = load_processor(model_dir).tokenizer
    ids = tokenizer.convert_tokens_to_ids
    if config["model_type"] == "qwen2_5_vl":
        assert config["image_token_id"] == ids("<|image_pad|>")
        assert config["video_token_id"] == ids("<|video_pad|>")
        assert config["vision_start_token_id"] == ids("<|vision_start|>")
        assert config["vision_end_token_id"] == ids("<|vision_end|>")
        eos = [ids("<|im_end|>"), ids("<|endoftext|>")]
    else:
        assert config["image_token_index"] == ids("<image>")
        assert tokenizer("hi")["input_ids"][0] == ids("<s>") == tokenizer.bos_token_id
        eos = ids("</s>")
    assert config["text_config"]["eos_token_id"] == generation["eos_token_id"] == eos
    assert generation["do_sample"] is False


def test_pitfalls_are_in_the_configs(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    text = config["text_config"]
    assert "head_dim" in text
    assert text["num_key_value_heads"] < text["num_attention_heads"]
    tokenizer_vocab = len(load_processor(model_dir).tokenizer)
    if config["model_type"] == "llava":
        assert text["vocab_size"] == tokenizer_vocab
    else:
        assert text["vocab_size"] > tokenizer_vocab
    if config["model_type"] == "llava_next":
        assert text["head_dim"] != text["hidden_size"] // text["num_attention_heads"]
    if config["model_type"] == "qwen2_5_vl":
        assert sum(text["rope_parameters"]["mrope_section"]) == text["head_dim"] // 2
        assert config["vision_config"]["fullatt_block_indexes"] == [1]


def test_tiny_weights_are_small_and_deterministic(tmp_path):
    for family in FAMILIES:
        paths = [build_tiny_model(family, tmp_path / f"{family}{i}", seed=s) for i, s in enumerate((0, 0, 1))]
        weights = [(p / "model.safetensors").read_bytes() for p in paths]
        assert len(weights[0]) < 1_000_000
        assert weights[0] == weights[1] != weights[2]
        assert (paths[0] / "tokenizer.json").read_bytes() == (paths[2] / "tokenizer.json").read_bytes()


def test_100m_preset_has_about_100m_text_parameters(tmp_path):
    model_dir = build_tiny_model("llava", tmp_path, preset="100m")
    with safe_open(model_dir / "model.safetensors", "np") as weights:
        text_params = sum(int(np.prod(weights.get_slice(k).get_shape()))
                          for k in weights.keys() if "language_model" in k or "lm_head" in k)
    assert 80e6 < text_params < 120e6


@pytest.mark.parametrize("family,preset", [("gpt2", "tiny"), ("llava", "huge")])
def test_rejects_unknown_family_and_preset(tmp_path, family, preset):
    with pytest.raises(ValueError, match="choose one of"):
        build_tiny_model(family, tmp_path, preset=preset)
