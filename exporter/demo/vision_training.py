"""Train a LLaVA target's vision tower + projector on the synthetic task, the LM frozen.

    stage 1 (cheap, no LM): tower ─► patch features (flattened) ─► linear heads
            CE on count / colour / shape / position           (fresh images every step)
    stage 2 (LM loss):      prompt with the image ─► frozen LM ─► CE on the answer tokens
            "Two red circles at the top left.<|im_end|>"; gradients reach the image tokens
            only (tower + projector); logits are computed at the answer rows alone
    stage 3: stage 2 again with the position words' loss weighted (left/right is the part
            the LM learns last)
    stage 4: stage 3 at a lower learning rate
    stage 5 (both questions): mixed batches, each image asked QUESTION or DETAIL_QUESTION,
            answered "Two red circles at the top left." or ``Scene.detailed_answer()``
            (that sentence and three more, 39 tokens); the frozen LM tells the questions
            apart, the image tokens carry the facts, the LM copies them from its first sentence
    stages 6, 7: stage 5 with the position words weighted, at lower learning rates
    evaluate: greedy answers to both questions on held-out images, scored per attribute;
            a detailed answer counts as right only in the detailed form

The shipped file: stages 1-4 made the file of commit d7a25c5 (sha256 ed459594a593...), and
stages 5-7 continued it (``python -m vispec.exporter.demo.real_target --write-weights FILE
--detail-only``, which loads the file it rewrites); ``--write-weights`` alone runs stages
1-7 from scratch. On a busy 2-core machine give torch one thread (two spun: 19 s a step
instead of ~4); quiet, two threads take ~1.7 s a stage-5 step.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..settings import check_fields
from .synthetic_images import (
    ATTRIBUTES,
    COLOURS,
    COUNTS,
    DETAIL_QUESTION,
    POSITIONS,
    QUESTION,
    SHAPES,
    Example,
    detailed_form,
    examples,
    sample,
    score,
)

Progress = Callable[[str], None]
POSITION_WORDS = ("top", "bottom", "left", "right")  # the tokens an answer's position hangs on
# the words that name an attribute (stage 5 weights them all: the detailed answer's ~55
# tokens are mostly the fixed form, which must not drown the facts)
ATTRIBUTE_WORDS = (*COUNTS, *(c.capitalize() for c in COUNTS), *COLOURS, *SHAPES,
                   *(s + "s" for s in SHAPES), *POSITION_WORDS)
_CLASSES = {"count": 3, "colour": len(COLOURS), "shape": len(SHAPES), "position": len(POSITIONS)}


@dataclass(frozen=True)
class VisionTrainConfig:
    """Every stage's settings; stages 2-5 dominate the time (~1.5 s per step of 8 on 2
    quiet cores in stages 2-4: ~13 minutes; stage 5's longer answers ~3 s per step)."""

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
    detail_steps: int = 240
    detail_lr: float = 1e-3
    detail_fraction: float = 0.5  # of each stage-5 batch asked DETAIL_QUESTION
    detail_tower: bool = True  # the projector alone (5e-4) learnt no detailed form (0.03)
    detail_polish_steps: int = 200  # then a round per learning rate, the position words weighted
    detail_polish_lrs: tuple[float, ...] = (5e-4, 3e-4)
    seed: int = 0

    def __post_init__(self):
        check_fields(self, "steps >= 0, batches >= 1, learning rates and position_weight > 0, "
                           "detail_fraction in [0, 1]",
                     (lambda v: v >= 0, ("pretrain_steps", "steps", "position_steps", "polish_steps",
                                         "detail_steps", "detail_polish_steps")),
                     (lambda v: v >= 1, ("pretrain_batch", "batch")),
                     (lambda v: v > 0, ("pretrain_lr", "lr", "polish_lr", "detail_lr", "position_weight")),
                     (lambda v: 0 <= v <= 1, ("detail_fraction",)),
                     (lambda v: all(lr > 0 for lr in v), ("detail_polish_lrs",)))


@dataclass(frozen=True)
class Evaluation:
    """Greedy answers on held-out images and their per-attribute accuracy."""

    answers: tuple[str, ...]
    # attribute -> fraction named right; "all": every attribute right; with detailed answers
    # also "detailed <attribute>", "detailed form" (the answer is some scene's
    # ``detailed_answer()``) and "detailed all" (the form and every attribute right)
    accuracy: dict[str, float]
    detailed_answers: tuple[str, ...] = ()

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


def _prompt_ids(processor, image, question: str = QUESTION) -> torch.Tensor:
    """The prompt's ids ``[P]`` (image tokens expanded) for ``question`` about one image."""
    content = [{"type": "image"}, {"type": "text", "text": question}]
    chat = processor.apply_chat_template([{"role": "user", "content": content}],
                                         add_generation_prompt=True, tokenize=False)
    return processor(text=[chat], images=[image], return_tensors="pt")["input_ids"][0]


def _answer(example: Example, question: str) -> str:
    return example.scene.detailed_answer() if question == DETAIL_QUESTION else example.scene.answer()


def _answer_batch(processor, prompt: torch.Tensor, batch: list[Example],
                  question: str = QUESTION) -> tuple[torch.Tensor, torch.Tensor]:
    """``ids [B, L]`` (prompt, answer to ``question``, <|im_end|>, right padding) and
    ``labels [B, L]``: the token each position predicts, -100 outside the answers (right
    padding: the causal rows before it are untouched)."""
    tokenizer = processor.tokenizer
    answers = [tokenizer(_answer(e, question), add_special_tokens=False)["input_ids"]
               + [tokenizer.eos_token_id] for e in batch]
    width = max(map(len, answers))
    ids = torch.cat([prompt.expand(len(batch), -1),
                     torch.full((len(batch), width), tokenizer.eos_token_id)], dim=1)
    labels = torch.full_like(ids, -100)
    for i, a in enumerate(answers):
        ids[i, len(prompt):len(prompt) + len(a)] = torch.tensor(a)
        labels[i, len(prompt) - 1:len(prompt) + len(a) - 1] = torch.tensor(a)
    return ids, labels


def _answer_logits(model, processor, prompt: torch.Tensor, batch: list[Example],
                   question: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The LM's logits ``[N, V]`` at the answer rows of ``batch`` asked ``question`` and
    the tokens ``[N]`` they should predict."""
    ids, labels = _answer_batch(processor, prompt, batch, question)
    hidden = model.model(input_ids=ids, pixel_values=_pixels(processor, batch)).last_hidden_state
    keep = labels >= 0                                                    # [B, L]
    return model.lm_head(hidden[keep]), labels[keep]


def _trained_params(model, tower: bool = True) -> list[torch.nn.Parameter]:
    """The vision tower's (if ``tower``) and the projector's parameters (the LM stays frozen)."""
    modules = (model.model.vision_tower, model.model.multi_modal_projector)[0 if tower else 1:]
    return [p for m in modules for p in m.parameters()]


def _word_ids(tokenizer, words: tuple[str, ...]) -> list[int]:
    """The ids of ``words`` after a space (``ATTRIBUTE_WORDS``' capitalised counts also
    without: they open the short answer)."""
    texts = [" " + w for w in words] + [w for w in words if w[0].isupper()]
    return sorted({i for t in texts for i in tokenizer(t, add_special_tokens=False)["input_ids"]})


def fit_answers(model, processor, config: VisionTrainConfig, progress: Progress,
                position_weight: float = 1.0, stage: int = 2, detail_fraction: float = 0.0,
                weighted: tuple[str, ...] = POSITION_WORDS, tower: bool = True) -> None:
    """Stages 2-5: tower (if ``tower``) + projector learn to make the frozen LM answer
    right (the ``weighted`` words' loss weighted ``position_weight``); ``detail_fraction``
    of each batch's images (rounded) are asked DETAIL_QUESTION, the others QUESTION."""
    model.requires_grad_(False)
    params = _trained_params(model, tower)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 20) * (1 - s / max(1, config.steps)))
    rng = np.random.default_rng([config.seed, 0, 2])
    image = sample(rng, 1)[0].image
    detailed = round(config.batch * detail_fraction)
    # one forward per question (answers of one length: little padding)
    groups = [(q, n) for q, n in ((DETAIL_QUESTION, detailed), (QUESTION, config.batch - detailed)) if n]
    prompts = {q: _prompt_ids(processor, image, q) for q, _ in groups}
    weights = torch.ones(model.config.text_config.vocab_size)
    weights[_word_ids(processor.tokenizer, weighted)] = position_weight
    start, window = time.perf_counter(), []
    for step in range(1, config.steps + 1):
        batch = sample(rng, config.batch)
        parts, first = [], 0
        for question, n in groups:
            parts.append(_answer_logits(model, processor, prompts[question],
                                        batch[first:first + n], question))
            first += n
        logits, labels = (torch.cat(t) for t in zip(*parts))            # [N, V], [N]
        loss = torch.nn.functional.cross_entropy(logits, labels, weight=weights)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        window.append((loss.item(), float((logits.argmax(-1) == labels).float().mean())))
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
    """The stages in place on ``model`` (a LlavaForConditionalGeneration): 1 tower
    pretraining, 2 answers, 3 answers with the position words weighted, 4 the same at a
    lower learning rate (top left and top right were the last errors), 5-7 both questions
    (``fit_detail``)."""
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
    _round_to_shipped(model)
    fit_detail(model, processor, config, progress)
    progress(f"trained vision tower + projector in {time.perf_counter() - start:.0f}s")


def fit_detail(model, processor, config: VisionTrainConfig = VisionTrainConfig(),
               progress: Progress = lambda msg: None) -> None:
    """Stages 5+ in place, mixed batches of both questions (``detail_fraction`` asked
    DETAIL_QUESTION): stage 5 at ``detail_lr``, every attribute word weighted
    ``position_weight``; then per ``detail_polish_lrs`` a round of ``detail_polish_steps``
    with the position words alone weighted (position is what stage 5 loses: held-out
    positions 0.84 right after it, 0.92 after one round, 0.95 after two). The projector
    alone unless ``detail_tower``."""
    stage = dataclasses.replace(config, steps=config.detail_steps, lr=config.detail_lr,
                                seed=config.seed + 34)
    fit_answers(model, processor, stage, progress, position_weight=config.position_weight,
                stage=5, detail_fraction=config.detail_fraction, weighted=ATTRIBUTE_WORDS,
                tower=config.detail_tower)
    for number, lr in enumerate(config.detail_polish_lrs, start=6):
        _round_to_shipped(model)
        polish = dataclasses.replace(config, steps=config.detail_polish_steps, lr=lr,
                                     seed=config.seed + 55)
        fit_answers(model, processor, polish, progress, position_weight=config.position_weight,
                    stage=number, detail_fraction=config.detail_fraction, tower=config.detail_tower)
    model.eval()


@torch.no_grad()
def greedy_answers(model, processor, held_out: list[Example], question: str = QUESTION,
                   max_new_tokens: int = 16, batch: int = 16,
                   progress: Progress = lambda msg: None) -> list[str]:
    """Greedy answers (HF ``generate``, batches of ``batch``) to ``question`` about each image."""
    prompt = _prompt_ids(processor, held_out[0].image, question)
    answers = []
    for i in range(0, len(held_out), batch):
        part = held_out[i:i + batch]
        ids = prompt.expand(len(part), -1)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             pixel_values=_pixels(processor, part), max_new_tokens=max_new_tokens,
                             do_sample=False)
        answers += processor.tokenizer.batch_decode(out[:, len(prompt):], skip_special_tokens=True)
        progress(f"answered {len(answers)}/{len(held_out)} held-out images ({question!r})")
    return answers


def evaluate(model, processor, n: int = 64, seed: int = 0, batch: int = 16, detailed: bool = True,
             progress: Progress = lambda msg: None) -> Evaluation:
    """Greedy answers (HF ``generate``) on ``n`` held-out images, scored per attribute: to
    QUESTION, and (``detailed``) to DETAIL_QUESTION."""
    held_out = examples(n, seed, "heldout")
    answers = greedy_answers(model, processor, held_out, QUESTION, 16, batch, progress)
    long = greedy_answers(model, processor, held_out, DETAIL_QUESTION, 64, batch, progress) \
        if detailed else None
    return scored(answers, held_out, long)


def scored(answers: list[str], held_out: list[Example],
           detailed: list[str] | None = None) -> Evaluation:
    """Each answer scored against its image's scene, per attribute and all four at once;
    ``detailed`` answers (to DETAIL_QUESTION) too, "detailed all" requiring the detailed
    form besides every attribute."""
    scores = [score(a, e.scene) for a, e in zip(answers, held_out)]
    accuracy = {a: float(np.mean([s[a] for s in scores])) for a in ATTRIBUTES}
    accuracy["all"] = float(np.mean([all(s.values()) for s in scores]))
    if detailed is not None:
        long = [score(a, e.scene) for a, e in zip(detailed, held_out)]
        form = [detailed_form(a) for a in detailed]
        accuracy.update({f"detailed {a}": float(np.mean([s[a] for s in long])) for a in ATTRIBUTES})
        accuracy["detailed form"] = float(np.mean(form))
        accuracy["detailed all"] = float(np.mean([f and all(s.values()) for f, s in zip(form, long)]))
    return Evaluation(tuple(a.strip() for a in answers), accuracy,
                      tuple(a.strip() for a in detailed or ()))
