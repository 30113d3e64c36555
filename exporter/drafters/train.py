"""EAGLE-style self-distillation: train a drafter to predict its own target (CPU-sized).

    data : random word prompts (half with a noise image) -> the target decodes a continuation;
           per sequence: ids [L], LM-input embeddings e [L,H], features f [L,H], logits [L,V]
    rows : the drafter's full-sequence forward in the runtime's row layout (reference.py:
           EAGLE shift, ViSpec image compression, HiViS image removal)
    loss : row r pairs f_s with e_n (n = the next token the row sees, s + 1 or the next text
           token) and learns  CE(lm_head(hidden_r), softmax(logits_n))
                              + feature_weight * smooth_l1(hidden_r, f_n)
Frozen: ``embed_tokens`` (the target's copy) and the target's lm_head.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from vispec.runtime.atomic import atomic_output_dir
from vispec.runtime.drafters.layouts import hivis_text_rows
from vispec.runtime.families import FamilyGlue, Prompt
from vispec.runtime.processors import load_processor

from ..loading import load_target
from ..reference import hf_lm, hf_prompt_embeds
from .checkpoint import drafter_config, load_drafter, new_drafter, write_checkpoint
from .draft_vocab import count_tokens, save_counts
from .modules import Drafter
from .reference import drafter_rows, run_rows

Progress = Callable[[str], None]
_WORDS = ("the a red blue green small big old new cat dog boat car tree house man woman child "
          "bird sky water road city park table cup book picture image photo left right near "
          "under over next to and with is are sits runs looks holds shows describe what how "
          "many where colour there people two three bright dark quiet busy morning night "
          "street field garden kitchen window door train horse").split()
_IMAGE_SIZE = 56


@dataclass(frozen=True)
class TrainConfig:
    """Distillation settings; ``temperature`` 0 decodes the data greedily."""

    steps: int = 1000
    lr: float = 3e-3
    sequences: int = 512
    new_tokens: int = 48
    temperature: float = 0.0
    feature_weight: float = 0.1
    seed: int = 0
    with_images: bool = True
    batch: int = 4  # sequences per optimiser step

    def __post_init__(self):
        problems = [f"{name}={getattr(self, name)}" for name in ("steps", "sequences",
                    "new_tokens", "batch") if getattr(self, name) < 1]
        problems += [f"{name}={getattr(self, name)}" for name in ("temperature",
                     "feature_weight") if getattr(self, name) < 0]
        problems += [f"lr={self.lr}"] if not self.lr > 0 else []
        if problems:
            raise ValueError(f"TrainConfig | {', '.join(problems)}. Expected: steps, sequences, "
                             f"new_tokens, batch >= 1; lr > 0; temperature, feature_weight >= 0")


@dataclass(frozen=True)
class Sample:
    """One decoded sequence (prompt + continuation) as the target saw it."""

    ids: np.ndarray          # [L] int64
    embeds: torch.Tensor     # [L, H] LM-input embeddings (image features placed)
    features: torch.Tensor   # [L, H] final post-norm hidden states
    logits: torch.Tensor | None = None  # [L, V]; None: lm_head(features), computed per use
    label_from: int = 0      # rows that see a token before this index are not labelled


@dataclass(frozen=True)
class Metrics:
    loss: float
    top1: float  # fraction of labelled rows where the drafter's argmax is the target's


# -- data ---------------------------------------------------------------------------------
def random_prompt(glue: FamilyGlue, processor, rng: np.random.Generator,
                  with_image: bool) -> Prompt:
    """A prompt of 3-12 random words, with one noise image if ``with_image``."""
    text = " ".join(rng.choice(_WORDS, size=int(rng.integers(3, 13))))
    pixels = rng.integers(0, 256, (_IMAGE_SIZE, _IMAGE_SIZE, 3), dtype=np.uint8)
    return glue.prepare(processor, text, [Image.fromarray(pixels)] if with_image else [])


@torch.no_grad()
def decode(adapter, glue: FamilyGlue, prompt: Prompt, new_tokens: int, temperature: float,
           generator: torch.Generator) -> Sample:
    """The target (HF PyTorch) continues ``prompt`` by up to ``new_tokens`` tokens (stops
    after EOS), keeping every position's e, f and logits."""
    eos = adapter.model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or [])
    embeds = hf_prompt_embeds(adapter, glue, prompt)                # [P, H]
    positions, next_position = glue.position_ids(prompt)
    logits, hidden, cache = hf_lm(adapter, embeds, positions)
    ids, rows = list(prompt.input_ids), [(embeds, hidden, logits)]
    for i in range(new_tokens):
        token = _choose(logits[-1], temperature, generator)
        ids.append(token)
        e = adapter.language_model.embed_tokens(torch.tensor([token]))  # [1, H]
        logits, hidden, cache = hf_lm(
            adapter, e, glue.step_position_ids(next_position + i, np.zeros(1, np.int64)), cache)
        rows.append((e, hidden, logits))
        if token in eos:
            break
    e, f, z = (torch.cat(parts) for parts in zip(*rows))
    return Sample(np.asarray(ids, np.int64), e, f, z)


def _choose(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> int:
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def decode_samples(adapter, glue: FamilyGlue, processor, config: TrainConfig,
                   progress: Progress = lambda msg: None) -> list[Sample]:
    """``config.sequences`` random prompts (every other one with an image) decoded."""
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    samples = []
    for i in range(config.sequences):
        prompt = random_prompt(glue, processor, rng, config.with_images and i % 2 == 1)
        samples.append(decode(adapter, glue, prompt, config.new_tokens, config.temperature,
                              generator))
    progress(f"decoded {len(samples)} sequences ({sum(len(s.ids) for s in samples)} tokens)")
    return samples


def make_training_data(target_model_dir: str | os.PathLike, config: TrainConfig = TrainConfig(),
                       progress: Progress = lambda msg: None) -> list[Sample]:
    """Distillation data from the target at ``target_model_dir``."""
    adapter, glue = load_target(target_model_dir)
    return decode_samples(adapter, glue, load_processor(target_model_dir), config, progress)


# -- loss ---------------------------------------------------------------------------------
def target_logits(sample: Sample, lm_head_weight: torch.Tensor, rows) -> torch.Tensor:
    """The target's logits ``[M, V]`` at ``rows`` (stored, or its LM head on the features)."""
    if sample.logits is not None:
        return sample.logits[rows]
    return sample.features[rows] @ lm_head_weight.T


def fused_rows(drafter: Drafter, glue: FamilyGlue, sample: Sample,
               lm_head_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The runtime's decoder-layer inputs ``[N, H]`` and positions ``[N]`` over a whole
    sequence, as ``reference_prefill`` builds them (with gradients)."""
    last = target_logits(sample, lm_head_weight, slice(-1, None))
    x_next = drafter.embed_tokens(last.argmax(-1))  # [1, H]
    fused, positions, _ = drafter_rows(drafter, glue, sample.ids, sample.embeds,
                                       sample.features, x_next)
    return fused, positions


def _shifted_next(glue: FamilyGlue, ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """EAGLE/ViSpec: the row at position p sees x_{p+1}; image rows are unlabelled."""
    nxt = positions + 1
    valid = nxt < len(ids)
    valid[valid] = ids[nxt[valid]] != glue.image_token_id
    return np.where(valid, nxt, -1)


def _hivis_next(glue: FamilyGlue, ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """HiViS: row r sees the next kept (text) token."""
    kept, _ = hivis_text_rows(glue, ids)
    return np.append(kept[1:], -1)


# kind -> (glue, ids [L], row positions [N]) -> [N] index of the token each row sees next
# (its label: the target's logits and feature there), -1 for none
_NEXT_TOKEN = {"eagle": _shifted_next, "vispec": _shifted_next, "hivis": _hivis_next}


def sample_loss(drafter: Drafter, lm_head_weight: torch.Tensor, glue: FamilyGlue,
                sample: Sample, feature_weight: float) -> tuple[torch.Tensor, int, int]:
    """(mean loss, rows whose top-1 is the target's, labelled rows) of one sequence."""
    fused, positions = fused_rows(drafter, glue, sample, lm_head_weight)
    rows = run_rows(drafter, lm_head_weight, fused, positions)
    nxt = _NEXT_TOKEN[drafter.kind](glue, sample.ids, positions.numpy())
    labelled = (nxt >= 0) & (nxt >= sample.label_from)
    keep, nxt = torch.as_tensor(labelled), nxt[labelled]
    logp, target = rows.logp[keep], target_logits(sample, lm_head_weight, nxt)  # [M, V]
    ce = -(torch.softmax(target, -1) * logp).sum(-1).mean()
    reg = torch.nn.functional.smooth_l1_loss(rows.hidden[keep], sample.features[nxt])
    agree = int((logp.argmax(-1) == target.argmax(-1)).sum())
    return ce + feature_weight * reg, agree, len(nxt)


def batch_loss(drafter: Drafter, lm_head_weight: torch.Tensor, glue: FamilyGlue,
               samples: list[Sample], feature_weight: float) -> tuple[torch.Tensor, int, int]:
    """``sample_loss`` over ``samples``, the loss averaged over labelled rows."""
    results = [sample_loss(drafter, lm_head_weight, glue, s, feature_weight) for s in samples]
    count = sum(c for _, _, c in results)
    loss = sum(loss * c for loss, _, c in results) / count
    return loss, sum(a for _, a, _ in results), count


@torch.no_grad()
def evaluate(drafter: Drafter, lm_head_weight: torch.Tensor, glue: FamilyGlue,
             samples: list[Sample], feature_weight: float = 0.1) -> Metrics:
    """Mean loss and top-1 agreement with the target over ``samples``."""
    return _summary([sample_loss(drafter, lm_head_weight, glue, s, feature_weight)
                     for s in samples])


def _summary(results: list[tuple[torch.Tensor, int, int]]) -> Metrics:
    """Row-weighted means of ``batch_loss`` results."""
    rows = sum(count for _, _, count in results)
    return Metrics(sum(float(loss) * count for loss, _, count in results) / rows,
                   sum(agree for _, agree, _ in results) / rows)


# -- training -----------------------------------------------------------------------------
def initial_drafter(target_model_dir, kind: str | None, init_dir, seed: int) -> Drafter:
    """``init_dir``'s drafter (its kind must equal ``kind`` if given) or a fresh one."""
    if init_dir is None:
        if kind is None:
            raise ValueError("train_drafter needs a `kind` or an `init_dir`")
        return new_drafter(kind, target_model_dir, seed)
    found = drafter_config(init_dir, target_model_dir).kind  # cheap checks first
    if kind is not None and kind != found:
        raise ValueError(f"init_dir {init_dir} holds a {found!r} drafter, not {kind!r}")
    return load_drafter(init_dir, target_model_dir)


def fit(drafter: Drafter, lm_head_weight: torch.Tensor, glue: FamilyGlue,
        samples: list[Sample], config: TrainConfig,
        progress: Progress = lambda msg: None) -> Metrics:
    """Adam on the drafter's own weights (``embed_tokens`` frozen); returns the metrics of
    the last logging window."""
    drafter.embed_tokens.requires_grad_(False)
    params = [p for p in drafter.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=config.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 1 - step / config.steps)  # linear decay to 0
    rng = np.random.default_rng(config.seed)
    every = max(1, config.steps // 10)
    window = []  # batch_loss results since the last report
    drafter.train()
    for step in range(1, config.steps + 1):
        batch = rng.choice(len(samples), size=min(config.batch, len(samples)), replace=False)
        loss, agree, count = batch_loss(drafter, lm_head_weight, glue,
                                        [samples[i] for i in batch], config.feature_weight)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        window.append((loss.detach(), agree, count))
        if step % every == 0 or step == config.steps:
            metrics, window = _summary(window), []
            progress(f"step {step}/{config.steps} loss {metrics.loss:.3f} "
                     f"top-1 {metrics.top1:.2f}")
    drafter.eval()
    return metrics


def save_token_counts(folder: str | os.PathLike, samples: list[Sample], vocab_size: int) -> Path:
    """``token_counts.json`` beside a checkpoint: the frequencies of the tokens the drafter
    was trained to predict (what ``export-drafter --draft-vocab`` keeps)."""
    return save_counts(folder, count_tokens((s.ids[s.label_from:] for s in samples), vocab_size))


def train_drafter(target_model_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                  kind: str | None = None, init_dir: str | os.PathLike | None = None,
                  config: TrainConfig = TrainConfig(), overwrite: bool = False,
                  progress: Progress = lambda msg: None) -> Path:
    """Distil a drafter (from ``init_dir`` or a fresh one of ``kind``) from the target at
    ``target_model_dir``; writes the official checkpoint layout into ``out_dir``
    atomically and returns it."""
    start = time.perf_counter()
    inputs = [target_model_dir] + ([init_dir] if init_dir is not None else [])
    with atomic_output_dir(out_dir, overwrite, inputs=inputs) as tmp:  # checks out_dir first
        drafter = initial_drafter(target_model_dir, kind, init_dir, config.seed)
        adapter, glue = load_target(target_model_dir)
        lm_head = adapter.lm_head.weight.detach().float()  # [V, H], frozen
        samples = decode_samples(adapter, glue, load_processor(target_model_dir), config,
                                 progress)
        fit(drafter, lm_head, glue, samples, config, progress)
        write_checkpoint(drafter, tmp)
        save_token_counts(tmp, samples, drafter.config.vocab_size)
    progress(f"trained {drafter.kind} drafter -> {out_dir} in "
             f"{time.perf_counter() - start:.1f}s")
    return Path(out_dir)
