"""A LLaVA-1.5 target whose language model is the real SmolLM2-135M-Instruct.

    image 64x64 ─► CLIP tower (3 layers, hidden 128, 16 px patches) ─► 16 patch features
               ─► projector (128 -> 576 -> 576) ─► 16 image tokens in the SmolLM2 prompt
    prompt     "<|im_start|>user\\n<image>\\nDescribe the image.<|im_end|>\\n<|im_start|>assistant\\n"
               (or "Describe the picture in detail.": the 39-token detailed description)

The tower and projector are trained on the synthetic task of ``synthetic_images`` with the
LM frozen (``vision_training``); their weights ship in ``assets/`` (fp16, ~2 MB), so
``make_target`` only converts the GGUF (cached) and assembles the folder. Reproduce the
shipped weights with ``python -m vispec.exporter.demo.real_target --write-weights`` (stages 1-7
from scratch; the shipped file is stages 1-4's file continued with stages 5-7, the detailed
description: ``--write-weights FILE --detail-only`` continues FILE with them).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoTokenizer,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from vispec.runtime.atomic import MARKER, atomic_output_dir
from vispec.runtime.cache import cache_dir
from vispec.runtime.errors import ModelDirError

from .real_lm import smollm2_dir
from .synthetic_images import DETAIL_QUESTION, IMAGE_SIZE, QUESTION, examples
from .vision_training import (
    Evaluation,
    VisionTrainConfig,
    evaluate,
    fit_answers,
    fit_detail,
    scored,
    train_vision,
)

Progress = Callable[[str], None]
WEIGHTS = Path(__file__).parent / "assets" / "smollm2_llava_vision.safetensors"
IMAGE_TOKEN = "<image>"
PATCH = 16
VISION = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
              image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=128)
VOCAB_MULTIPLE = 64  # the added <image> row and padding rows are zero (logit 0, never input)
_TRAINED = ("vision_tower.", "multi_modal_projector.")

# SmolLM2's ChatML without its default system turn (fewer tokens); images before the text.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_processor(lm_dir: str | os.PathLike) -> LlavaProcessor:
    """LlavaProcessor: CLIP preprocessing at 64 px and SmolLM2's tokenizer plus ``<image>``."""
    tokenizer = AutoTokenizer.from_pretrained(str(lm_dir), local_files_only=True)
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                            crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=CHAT_TEMPLATE, image_token=IMAGE_TOKEN)


def build_model(lm_dir: str | os.PathLike, processor: LlavaProcessor,
                seed: int = 0) -> LlavaForConditionalGeneration:
    """LLaVA-1.5 with SmolLM2's weights (vocab padded for ``<image>``) and a fresh CLIP tower
    and projector (seeded)."""
    lm = LlamaForCausalLM.from_pretrained(str(lm_dir), local_files_only=True, dtype=torch.float32)
    tokenizer = processor.tokenizer
    text = copy.deepcopy(lm.config)
    text.vocab_size = -(-len(tokenizer) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    config = LlavaConfig(vision_config=CLIPVisionConfig(**VISION), text_config=text,
                         image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                         image_seq_length=(IMAGE_SIZE // PATCH) ** 2,
                         vision_feature_select_strategy="default", vision_feature_layer=-1,
                         tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    state = lm.model.state_dict()
    embed = state["embed_tokens.weight"]  # [49152, 576] -> [vocab, 576], new rows zero
    state["embed_tokens.weight"] = torch.cat([embed, embed.new_zeros(text.vocab_size - len(embed), embed.shape[1])])
    model.model.language_model.load_state_dict(state)
    model.tie_weights()
    model.generation_config = GenerationConfig(
        do_sample=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return model


def trained_state(model: LlavaForConditionalGeneration) -> dict[str, torch.Tensor]:
    """The trained part (vision tower + projector) as fp16 tensors keyed like the model's."""
    return {k: v.detach().half().contiguous() for k, v in model.model.state_dict().items()
            if k.startswith(_TRAINED)}


def load_trained(model: LlavaForConditionalGeneration, path: str | os.PathLike) -> None:
    """Load a ``trained_state`` file into ``model`` (float32)."""
    state = {k: v.float() for k, v in load_file(str(path)).items()}
    missing = {k for k in model.model.state_dict() if k.startswith(_TRAINED)} - set(state)
    if missing or not state.keys() <= set(model.model.state_dict()):
        raise ValueError(f"{path} does not match the vision tower/projector layout "
                         f"(missing {sorted(missing)[:3]}). Hint: rebuild it with --write-weights")
    model.model.load_state_dict(state, strict=False)


def make_target(out_dir: str | os.PathLike, *, train: bool = False,
                config: VisionTrainConfig = VisionTrainConfig(), overwrite: bool = False,
                progress: Progress = lambda msg: None) -> Path:
    """Write the SmolLM2 LLaVA-1.5 target to ``out_dir`` (atomically) and return it.

    ``train=False`` loads the shipped vision weights (seconds once SmolLM2 is converted);
    ``train=True`` trains the tower and projector from scratch with ``config`` (minutes).
    """
    start = time.perf_counter()
    with atomic_output_dir(out_dir, overwrite) as tmp:
        lm_dir = smollm2_dir(progress=progress)
        processor = build_processor(lm_dir)
        model = build_model(lm_dir, processor, config.seed)
        if train:
            train_vision(model, processor, config, progress)
        else:
            load_trained(model, WEIGHTS)
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    progress(f"SmolLM2 LLaVA target -> {out_dir} in {time.perf_counter() - start:.1f}s")
    return Path(out_dir)


def cached_target(progress: Progress = lambda msg: None) -> Path:
    """The target folder built from the shipped weights, kept in the cache (keyed by the
    weights' hash): built once (~30 s), then reused."""
    if not WEIGHTS.is_file():
        raise ModelDirError(f"the vision weights {WEIGHTS} are missing. Hint: reproduce them "
                            f"with `python -m vispec.exporter.demo.real_target --write-weights`")
    digest = hashlib.sha256(WEIGHTS.read_bytes()).hexdigest()[:12]
    out = Path(cache_dir()) / "smollm2-llava" / f"target-{digest}"
    if (out / "config.json").is_file():
        return out
    make_target(out, overwrite=True, progress=progress)
    for stale in remove_other_targets(out):
        progress(f"removed {stale} (built from earlier vision weights)")
    return out


def remove_other_targets(keep: Path) -> list[Path]:
    """Delete the cached targets beside ``keep`` (ours: marked, ``target-*``), built from
    vision weights this version no longer ships (~0.5 GB each); returns them."""
    stale = [p for p in keep.parent.glob("target-*")
             if p != keep and (p / MARKER).is_file()]
    for p in stale:
        shutil.rmtree(p)
    return stale


def write_weights(path: str | os.PathLike = WEIGHTS, config: VisionTrainConfig = VisionTrainConfig(),
                  continue_steps: int = 0, detail_only: bool = False,
                  progress: Progress = lambda msg: None) -> Path:
    """Train from scratch (``continue_steps`` > 0: continue the weights at ``path`` with that
    many more stage-2 steps on fresh images; ``detail_only``: continue them with stages 5-7
    alone, as the shipped file was made), report held-out accuracy, write
    ``trained_state`` to ``path``."""
    lm_dir = smollm2_dir(progress=progress)
    processor = build_processor(lm_dir)
    model = build_model(lm_dir, processor, config.seed)
    if continue_steps > 0 or detail_only:
        load_trained(model, path)
    if continue_steps > 0:
        more = dataclasses.replace(config, steps=continue_steps, seed=config.seed + 1)
        fit_answers(model, processor, more, progress)
        model.eval()
    if detail_only:
        fit_detail(model, processor, config, progress)
    elif continue_steps <= 0:
        train_vision(model, processor, config, progress)
    report = evaluate(model, processor, progress=progress)
    progress(report.summary())
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(trained_state(model), str(path))
    return Path(path)


def evaluate_weights(path: str | os.PathLike = WEIGHTS, n: int = 128, seed: int = 11,
                     progress: Progress = lambda msg: None) -> Evaluation:
    """Held-out accuracy of the target with the vision weights at ``path``."""
    lm_dir = smollm2_dir(progress=progress)
    processor = build_processor(lm_dir)
    model = build_model(lm_dir, processor, 0)
    load_trained(model, path)
    return evaluate(model.eval(), processor, n=n, seed=seed, progress=progress)


def evaluate_artifacts(artifact_dir: str | os.PathLike, n: int = 128, seed: int = 11,
                       progress: Progress = lambda msg: None) -> Evaluation:
    """Held-out accuracy of an exported target (e.g. ``export --weights int4``) under the
    runtime: plain greedy answers (ONNX Runtime CPU) to the images ``evaluate_weights``
    scores, both questions, 16 and 64 new tokens at most as there."""
    from vispec.runtime.generate import generate_plain
    from vispec.runtime.target import TargetModel

    target = TargetModel(artifact_dir)
    held_out = examples(n, seed, "heldout")
    answers: dict[str, list[str]] = {QUESTION: [], DETAIL_QUESTION: []}
    for i, example in enumerate(held_out, 1):
        for question, budget in ((QUESTION, 16), (DETAIL_QUESTION, 64)):
            tokens = generate_plain(target, target.prepare(question, [example.image]), budget).tokens
            answers[question].append(target.processor.tokenizer.decode(tokens, skip_special_tokens=True))
        if i % 16 == 0 or i == n:
            progress(f"evaluated {i}/{n} held-out images")
    return scored(answers[QUESTION], held_out, answers[DETAIL_QUESTION])


def write_calibration(folder: str | os.PathLike, n: int = 32, seed: int = 5) -> Path:
    """A calibration file for ``export --weights-method gptq`` (``folder/prompts.txt``):
    ``n`` training-split images (``folder/NNN.png``; never the held-out ones) each with both
    questions, then GPTQ's built-in text prompts (more chat instructions: 0.92 of the
    held-out images right instead of 0.94, text agreement 0.84 instead of 0.80). Returns
    the file."""
    from vispec.exporter.gptq import PROMPTS

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, example in enumerate(examples(n, seed, "train")):
        example.image.save(folder / f"{i:03d}.png")
        lines += [f"{i:03d}.png\t{question}" for question in (QUESTION, DETAIL_QUESTION)]
    path = folder / "prompts.txt"
    path.write_text("\n".join(lines + list(PROMPTS)) + "\n", encoding="utf-8")
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Reproduce or score the shipped vision weights.")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write-weights", type=Path, nargs="?", const=WEIGHTS)
    action.add_argument("--evaluate", type=Path, nargs="?", const=WEIGHTS,
                        help="score a weights file on --images held-out images")
    action.add_argument("--calibration", type=Path, metavar="FOLDER",
                        help="write a GPTQ calibration file of --images training images there")
    parser.add_argument("--continue-steps", type=int, default=0,
                        help="continue the weights file with this many stage-2 steps")
    parser.add_argument("--detail-only", action="store_true",
                        help="continue the weights file with stages 5-7 alone (both questions: "
                             "the detailed description)")
    parser.add_argument("--images", type=int, default=None,
                        help="held-out images to score (128), or calibration images (32)")
    parser.add_argument("--artifacts", type=Path, default=None,
                        help="with --evaluate: score this exported target (ONNX Runtime) instead")
    args = parser.parse_args()
    if args.calibration:
        print(write_calibration(args.calibration, args.images or 32))
    elif args.evaluate and args.artifacts:
        print(evaluate_artifacts(args.artifacts, args.images or 128).summary())
    elif args.evaluate:
        print(evaluate_weights(args.evaluate, args.images or 128).summary())
    else:
        write_weights(args.write_weights, continue_steps=args.continue_steps,
                      detail_only=args.detail_only, progress=print)
