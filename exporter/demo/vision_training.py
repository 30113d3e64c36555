"""Train a LLaVA target's vision tower + projector on the synthetic task, the LM frozen.

    stage 1 (cheap, no LM): tower ─► patch features (flattened) ─► linear heads
            CE on count / colour / shape / position           (fresh images every step)
    stage 2 (LM loss):      prompt with the image ─► frozen LM ─► CE on the answer tokens
            "Two red circles at the top left.<|im_end|>"; gradients reach the image tokens
            only (tower + projector); logits are computed at the answer rows alone
    stage 3: stage 2 again with the position words' loss weighted (left/right is the part
            the LM learns last)
    evaluate: greedy answers on held-out images, scored per attribute
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..settings import check_fields
from .synthetic_images import ATTRIBUTES, COLOURS, POSITIONS, QUESTION, SHAPES, Example, examples, sample, score

Progress = Callable[[str], None]
POSITION_WORDS = ("top", "bottom", "left", "right")  # the tokens an answer's position hangs on
_CLASSES = {"count": 3, "colour": len(COLOURS), "shape": len(SHAPES), "position": len(POSITIONS)}


@dataclass(frozen=True)
class VisionTrainConfig:
    """Every stage's settings; stages 2-4 dominate the time (~1.5 s per step of 8 on 2
    quiet cores: ~13 minutes in all)."""

    pretrain_steps: int = 300
    pretrain_batch: int = 64
    pretrain_lr: float = 2e-3
    steps: int = 200
    batch: int = 8
    lr: float = 1e-3
    position_steps: int = 250
    position_weight: float = 3.0
    polish_steps: int = 200
    polish_lr: float = 5e-4
    seed: int = 0

    def __post_init__(self):
        check_fields(self, "steps >= 0, batches >= 1, learning rates and position_weight > 0",
                     (lambda v: v >= 0, ("pretrain_steps", "steps", "position_steps", "polish_steps")),
                     (lambda v: v >= 1, ("pretrain_batch", "batch")),
                     (lambda v: v > 0, ("pretrain_lr", "lr", "polish_lr", "position_weight")))


@dataclass(frozen=True)
class Evaluation:
    """Greedy answers on held-out images and their per-attribute accuracy."""

    answers: tuple[str, ...]
    accuracy: dict[str, float]  # attribute -> fraction named right; "all": every attribute right

    def summary(self) -> str:
        parts = ", ".join(f"{k} {v:.2f}" for k, v in self.accuracy.items())
        return (f"held-out accuracy over {len(self.answers)} images: {parts}; "
                f"{len(set(self.answers))} distinct answers")


def _labels(batch: list[Example]) -> dict[str, torch.Tensor]:
    values = {"count": lambda s: s.count - 1, "colour": lambda s: list(COLOURS).index(s.colour),
              "shape": lambda s: SHAPES.index(s.shape), "position": lambda s: POSITIONS.index(s.position)}
    return {a: torch.tensor([values[a](e.scene) for e in batch]) for a in ATTRIBUTES}


def _pixels(processor, batch: list[Example]) -> torch.Tensor:
    return processor.image_processor([e.image for e in batch], return_tensors="pt")["pixel_values"]


def _patch_features(model, pixels: torch.Tensor) -> torch.Tensor:
    """The tower's features at the config's layer, CLS dropped: ``[B, P, C]``."""
    hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
    return hidden[model.config.vision_feature_layer][:, 1:]


def pretrain_tower(model, processor, config: VisionTrainConfig, progress: Progress) -> None:
    """Stage 1: attribute classification, linear in the mean of the patch features: every
    patch must carry in its own features what it shows and where it is (the LM reads the
    patches one by one, not their layout)."""
    tower = model.model.vision_tower
    width = model.config.vision_config.hidden_size
    heads = torch.nn.ModuleDict({a: torch.nn.Linear(width, n) for a, n in _CLASSES.items()})
    params = list(tower.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.pretrain_lr, weight_decay=0.01)
    rng = np.random.default_rng([config.seed, 0, 1])  # heldout draws from [seed, 1]
    tower.train()
    for step in range(1, config.pretrain_steps + 1):
        batch = sample(rng, config.pretrain_batch)
        pooled = _patch_features(model, _pixels(processor, batch)).mean(1)  # [B, C]
        labels = _labels(batch)
        logits = {a: heads[a](pooled) for a in ATTRIBUTES}
        loss = sum(torch.nn.functional.cross_entropy(logits[a], labels[a]) for a in ATTRIBUTES)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % max(1, config.pretrain_steps // 5) == 0:
            acc = " ".join(f"{a} {(logits[a].argmax(-1) == labels[a]).float().mean():.2f}"
                           for a in ATTRIBUTES)
            progress(f"stage 1 step {step}/{config.pretrain_steps} loss {loss.item():.3f} {acc}")
    tower.eval()


def _prompt_ids(processor, image) -> torch.Tensor:
    """The prompt's ids ``[P]`` (image tokens expanded) for QUESTION about one image."""
    content = [{"type": "image"}, {"type": "text", "text": QUESTION}]
    chat = processor.apply_chat_template([{"role": "user", "content": content}],
                                         add_generation_prompt=True, tokenize=False)
    return processor(text=[chat], images=[image], return_tensors="pt")["input_ids"][0]


def _answer_batch(processor, prompt: torch.Tensor, batch: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """``ids [B, L]`` (prompt, answer, <|im_end|>, padding) and ``labels [B, L - P]``
    (-100 on padding): the tokens each answer row predicts."""
    tokenizer = processor.tokenizer
    answers = [tokenizer(e.scene.answer(), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
               for e in batch]
    width = max(map(len, answers))
    labels = torch.full((len(batch), width), -100)
    for i, a in enumerate(answers):
        labels[i, :len(a)] = torch.tensor(a)
    ids = torch.cat([prompt.expand(len(batch), -1), labels.clamp(min=0)], dim=1)
    return ids, labels


def _trained_params(model) -> list[torch.nn.Parameter]:
    """The vision tower's and the projector's parameters (the LM stays frozen)."""
    return [p for m in (model.model.vision_tower, model.model.multi_modal_projector) for p in m.parameters()]


def fit_answers(model, processor, config: VisionTrainConfig, progress: Progress,
                position_weight: float = 1.0, stage: int = 2) -> None:
    """Stages 2-4: tower + projector learn to make the frozen LM answer right (the position
    words' loss weighted ``position_weight``)."""
    model.requires_grad_(False)
    params = _trained_params(model)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 20) * (1 - s / max(1, config.steps)))
    rng = np.random.default_rng([config.seed, 0, 2])
    prompt = _prompt_ids(processor, sample(rng, 1)[0].image)
    weights = torch.ones(model.config.text_config.vocab_size)
    for word in POSITION_WORDS:
        word_ids = processor.tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        weights[word_ids] = position_weight
    start, window = time.perf_counter(), []
    for step in range(1, config.steps + 1):
        batch = sample(rng, config.batch)
        ids, labels = _answer_batch(processor, prompt, batch)
        hidden = model.model(input_ids=ids, pixel_values=_pixels(processor, batch)).last_hidden_state
        logits = model.lm_head(hidden[:, len(prompt) - 1:-1])            # [B, A, V]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(),
                                                 weight=weights)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        keep = labels >= 0
        window.append((loss.item(), float((logits.argmax(-1) == labels)[keep].float().mean())))
        if step % max(1, config.steps // 10) == 0 or step == config.steps:
            loss_mean, top1 = np.mean(window, axis=0)
            window = []
            progress(f"stage {stage} step {step}/{config.steps} loss {loss_mean:.3f} answer-token top-1 "
                     f"{top1:.2f} ({time.perf_counter() - start:.0f}s)")
    model.requires_grad_(False)


def _round_to_shipped(model) -> None:
    """Round the trained part to fp16 and back, as the shipped file stores it (each later
    stage starts from what a continuation of the shipped file would load)."""
    for param in _trained_params(model):
        param.data = param.data.half().float()


def train_vision(model, processor, config: VisionTrainConfig = VisionTrainConfig(),
                 progress: Progress = lambda msg: None) -> None:
    """Every stage in place on ``model`` (a LlavaForConditionalGeneration): 1 tower
    pretraining, 2 answers, 3 answers with the position words weighted, 4 the same at a
    lower learning rate (top left and top right were the last errors)."""
    start = time.perf_counter()
    pretrain_tower(model, processor, config, progress)
    progress(f"stage 1 done in {time.perf_counter() - start:.0f}s")
    fit_answers(model, processor, config, progress)
    later = (dataclasses.replace(config, steps=config.position_steps, seed=config.seed + 8),
             dataclasses.replace(config, steps=config.polish_steps, lr=config.polish_lr,
                                 seed=config.seed + 21))
    for number, stage in enumerate(later, start=3):
        _round_to_shipped(model)
        fit_answers(model, processor, stage, progress, position_weight=config.position_weight,
                    stage=number)
    model.eval()
    progress(f"trained vision tower + projector in {time.perf_counter() - start:.0f}s")


@torch.no_grad()
def evaluate(model, processor, n: int = 64, seed: int = 0, batch: int = 16,
             progress: Progress = lambda msg: None) -> Evaluation:
    """Greedy answers (HF ``generate``) on ``n`` held-out images, scored per attribute."""
    held_out = examples(n, seed, "heldout")
    prompt = _prompt_ids(processor, held_out[0].image)
    answers = []
    for i in range(0, n, batch):
        part = held_out[i:i + batch]
        ids = prompt.expand(len(part), -1)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             pixel_values=_pixels(processor, part), max_new_tokens=16, do_sample=False)
        answers += processor.tokenizer.batch_decode(out[:, len(prompt):], skip_special_tokens=True)
        progress(f"evaluated {len(answers)}/{n} held-out images")
    return scored(answers, held_out)


def scored(answers: list[str], held_out: list[Example]) -> Evaluation:
    """Each answer scored against its image's scene, per attribute and all four at once."""
    scores = [score(a, e.scene) for a, e in zip(answers, held_out)]
    accuracy = {a: float(np.mean([s[a] for s in scores])) for a in ATTRIBUTES}
    accuracy["all"] = float(np.mean([all(s.values()) for s in scores]))
    return Evaluation(tuple(a.strip() for a in answers), accuracy)
