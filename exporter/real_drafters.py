"""Drafters for the SmolLM2 LLaVA target, self-distilled from its own answers (cached).

    prompts : synthetic training images + QUESTION, and text-only questions (fixed lists)
    decode  : the exported target under ONNX Runtime, greedy (vispec.runtime, plain decoding)
    teacher : one PyTorch forward per whole sequence -> LM-input embeddings e and features f
              (the target's logits are its LM head on f, computed per training step)
    train   : drafters.train.fit on the answer rows (ViSpec, HiViS, EAGLE), official layout

Data and checkpoints live under ``cache_dir()/smollm2-llava/``, keyed by the vision weights,
the settings and ``VERSION``; a second run loads them.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from vispec.runtime.atomic import atomic_output_dir
from vispec.runtime.families import Prompt
from vispec.runtime.tree_calibration import cache_dir

from .synthetic_images import QUESTION, examples

Progress = Callable[[str], None]
KINDS = ("vispec", "hivis", "eagle")
VERSION = 1  # bump when the data or training recipe changes
_TOPICS = ("the sun", "rain", "a cat", "a dog", "the sea", "a forest", "a city", "a river",
           "bread", "coffee", "a bicycle", "a train", "music", "the moon", "winter", "summer",
           "a garden", "a library", "mountains", "a school", "the wind", "an apple", "a bird",
           "a computer", "the stars", "a farm", "a bridge", "fire", "snow", "a market")
_TEMPLATES = ("What is {}?", "Describe {} in one sentence.", "Write a short poem about {}.",
              "Give me two facts about {}.", "Why do people like {}?")


@dataclass(frozen=True)
class DistillConfig:
    """Data and training settings of the real-LM drafters (the demo's defaults)."""

    image_prompts: int = 96
    text_prompts: int = 64
    image_tokens: int = 24   # new tokens per image answer (they end at EOS, ~11 tokens)
    text_tokens: int = 48
    steps: int = 300
    batch: int = 4
    lr: float = 1e-3
    seed: int = 0

    def __post_init__(self):
        bad = [f"{k}={v}" for k, v in asdict(self).items() if k != "seed" and not v > 0]
        if bad:
            raise ValueError(f"DistillConfig | {', '.join(bad)}. Expected: every field > 0")

    def key(self, fields: tuple[str, ...], extra: str = "") -> str:
        """A short hash of ``fields``' values, ``VERSION`` and ``extra`` (the weights' hash)."""
        values = {k: getattr(self, k) for k in fields}
        text = json.dumps({**values, "version": VERSION, "extra": extra}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


_DATA_FIELDS = ("image_prompts", "text_prompts", "image_tokens", "text_tokens", "seed")
_TRAIN_FIELDS = ("steps", "batch", "lr", "seed")


def text_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` questions drawn from the fixed templates x topics (deterministic)."""
    rng = np.random.default_rng([seed, 7])
    pairs = [(t, p) for t in _TEMPLATES for p in _TOPICS]
    order = rng.permutation(len(pairs))
    return [pairs[i][0].format(pairs[i][1]) for i in order[:n]]


def held_out_text_prompts() -> list[str]:
    """Questions absent from ``text_prompts`` (the demo's text prompts)."""
    return ["Tell me about a lighthouse.", "What is a volcano?"]


def file_hash(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


# -- data ---------------------------------------------------------------------------------
def decode_answers(target_onnx: str | os.PathLike, config: DistillConfig,
                   progress: Progress = lambda msg: None) -> list[tuple[Prompt, list[int]]]:
    """Greedy answers of the exported target (ONNX Runtime) to the distillation prompts:
    ``(prompt, new tokens)`` pairs, image prompts first."""
    from vispec.runtime.pipeline import Pipeline

    pipe = Pipeline(target_onnx, tree=None)
    jobs = [(QUESTION, [e.image], config.image_tokens)
            for e in examples(config.image_prompts, config.seed, "train")]
    jobs += [(q, [], config.text_tokens) for q in text_prompts(config.text_prompts, config.seed)]
    out, start, tokens = [], time.perf_counter(), 0
    for i, (text, images, budget) in enumerate(jobs, 1):
        result = pipe.generate(text, images, budget, draft=False)
        out.append((pipe.target.prepare(text, images), result.tokens))
        tokens += len(result.tokens)
        if i % 16 == 0 or i == len(jobs):
            elapsed = time.perf_counter() - start
            progress(f"distillation data: {i}/{len(jobs)} answers, {tokens} tokens "
                     f"({tokens / elapsed:.0f} tok/s, {elapsed:.0f}s)")
    return out


def teacher_arrays(model_dir: str | os.PathLike, answers: list[tuple[Prompt, list[int]]],
                   progress: Progress = lambda msg: None) -> list[dict[str, np.ndarray]]:
    """Per sequence: ids, LM-input embeddings, features (float32) and ``label_from`` (the
    prompt length), from one PyTorch forward over prompt + answer."""
    import torch

    from .loading import load_target
    from .reference import hf_lm, hf_prompt_embeds

    adapter, glue = load_target(model_dir)
    out = []
    with torch.no_grad():
        for prompt, tokens in answers:
            ids = np.concatenate([prompt.input_ids, np.asarray(tokens, np.int64)])
            whole = Prompt(ids, prompt.processed)
            embeds = hf_prompt_embeds(adapter, glue, whole)                  # [L, H]
            _, hidden, _ = hf_lm(adapter, embeds, glue.position_ids(whole)[0])
            out.append({"ids": ids, "embeds": embeds.numpy(), "features": hidden.numpy(),
                        "label_from": np.int64(len(prompt.input_ids))})
    progress(f"teacher features of {len(out)} sequences")
    return out


def _save(arrays: list[dict[str, np.ndarray]], path: Path) -> None:
    flat = {f"{i}.{k}": v for i, a in enumerate(arrays) for k, v in a.items()}
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **flat)
    os.replace(tmp, path)


def _load(path: Path) -> list[dict[str, np.ndarray]]:
    with np.load(path) as data:
        out: dict[int, dict[str, np.ndarray]] = {}
        for name in data.files:
            i, k = name.split(".", 1)
            out.setdefault(int(i), {})[k] = data[name]
    return [out[i] for i in sorted(out)]


def distill_data(model_dir, target_onnx, config: DistillConfig, folder: Path,
                 progress: Progress = lambda msg: None):
    """The training ``Sample``s, from ``folder/data.npz`` when cached."""
    import torch

    from .drafters.train import Sample

    path = folder / "data.npz"
    if path.is_file():
        progress(f"distillation data: cached ({path})")
        arrays = _load(path)
    else:
        arrays = teacher_arrays(model_dir, decode_answers(target_onnx, config, progress), progress)
        folder.mkdir(parents=True, exist_ok=True)
        _save(arrays, path)
    return [Sample(a["ids"], torch.from_numpy(a["embeds"]), torch.from_numpy(a["features"]),
                   label_from=int(a["label_from"])) for a in arrays]


# -- drafters -----------------------------------------------------------------------------
def cache_folder(model_dir: str | os.PathLike, config: DistillConfig) -> Path:
    """Where the distillation data of ``config`` for this target's weights lives (the
    checkpoints in subfolders keyed by the training settings)."""
    weights = Path(model_dir) / "model.safetensors"
    extra = file_hash(weights) if weights.is_file() else str(Path(model_dir).resolve())
    return Path(cache_dir()) / "smollm2-llava" / f"distill-{config.key(_DATA_FIELDS, extra)}"


def real_drafters(model_dir: str | os.PathLike, target_onnx: str | os.PathLike,
                  kinds: tuple[str, ...] = KINDS, config: DistillConfig = DistillConfig(),
                  progress: Progress = lambda msg: None) -> dict[str, Path]:
    """Checkpoint folders (official layout) of ``kinds`` for the target at ``model_dir``
    (exported at ``target_onnx``): cached ones reused, the others trained now."""
    from vispec.runtime.families import glue_for
    from vispec.runtime.model_dir import read_config

    from .drafters.checkpoint import new_drafter, write_checkpoint
    from .drafters.export import target_lm_head
    from .drafters.train import TrainConfig, fit, save_token_counts

    folder = cache_folder(model_dir, config)
    wanted = {kind: folder / f"{kind}-{config.key(_TRAIN_FIELDS)}" for kind in kinds}
    missing = [k for k, p in wanted.items() if not (p / "config.json").is_file()]
    if not missing:
        progress(f"drafters {', '.join(kinds)}: cached ({folder})")
        return wanted
    samples = distill_data(model_dir, target_onnx, config, folder, progress)
    glue = glue_for(read_config(model_dir))
    lm_head = target_lm_head(model_dir)
    train = TrainConfig(steps=config.steps, lr=config.lr, batch=config.batch, seed=config.seed)
    for kind in missing:
        start = time.perf_counter()
        progress(f"training the {kind} drafter ({config.steps} steps of {config.batch} sequences)")
        drafter = new_drafter(kind, model_dir, config.seed)
        metrics = fit(drafter, lm_head, glue, samples, train,
                      lambda m, kind=kind: progress(f"  {kind} {m}"))
        with atomic_output_dir(wanted[kind], overwrite=True) as tmp:
            write_checkpoint(drafter, tmp)
            save_token_counts(tmp, samples, drafter.config.vocab_size)
        progress(f"{kind} drafter trained in {time.perf_counter() - start:.0f}s "
                 f"(training top-1 {metrics.top1:.2f}) -> {wanted[kind]}")
    return wanted
