"""Distillation data at scale: the target's own greedy answers, batched, sharded over ranks.

    prompts : a user's file (one per line) or the built-in set (templated instructions of
              many kinds x topics, plus questions the target writes itself for personas x
              topics); images: a user's folder or the demo's synthetic images, each asked
              IMAGE_QUESTIONS
    answers : HF ``model.generate`` on batches of prompts (left-padded), on the rank's
              device (its GPU where CUDA is there, in float32): on 2 CPU cores ~5x the
              answer tokens/s of the exported target under ONNX Runtime, which decodes one
              sequence at a time (RESULTS.md)
    teacher : one PyTorch forward per sequence -> LM-input embeddings e and features f
    output  : OUT/answers/chunk-*.npz (ids, e, f in float16, label_from, job), chunk k
              written by rank k % world (``shards``); OUT/prompts.jsonl lists the jobs

Run it under ``torchrun --nproc_per_node N`` or ``accelerate launch`` to split the work;
rerun the same command after a kill to finish it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from vispec.runtime.errors import VispecError
from vispec.runtime.families import FamilyGlue, Prompt
from vispec.runtime.model_dir import check_weights, read_config
from vispec.runtime.processors import load_processor

from ..demo.synthetic_images import DETAIL_QUESTION, QUESTION, examples
from ..loading import load_target
from ..reference import hf_lm, hf_prompt_embeds
from . import shards
from .distributed import World, world_group
from .progress import ProgressBar

Progress = Callable[[str], None]
IMAGE_QUESTIONS = (QUESTION, DETAIL_QUESTION)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
QUESTION_TOKENS = 40  # budget of a question the target writes
SYNTHETIC = "synthetic:"  # image reference prefix: "synthetic:<i>" is examples()[i]

# Prompts no built-in prompt may equal, and whose subjects the topics leave out: the demo's
# text prompts and ordinary chat prompts held out to measure drafters on unseen text.
HELD_OUT_CHAT = ("Tell me about a lighthouse.", "What is a volcano?",
                 "Write a short story about a robot learning to paint.",
                 "Explain how a bicycle works.", "Give me three tips for a job interview.",
                 "Why is the sky blue?", "Write a haiku about autumn leaves.",
                 "How do I make a cup of green tea?",
                 "What is the difference between a virus and a bacterium?",
                 "Describe a day in the life of a lighthouse keeper.")
TOPICS = (
    "baking bread", "the Roman Empire", "learning Python", "saving money", "marathon training",
    "black holes", "houseplants", "climate change", "the human heart", "chess", "jazz music",
    "electric cars", "honey bees", "the French Revolution", "photography", "meditation",
    "coral reefs", "the stock market", "public speaking", "video games", "the moon landing",
    "composting", "dinosaurs", "machine learning", "coffee", "the Amazon rainforest",
    "renewable energy", "sleep", "the printing press", "recycling", "knitting", "earthquakes",
    "the Olympic Games", "vaccines", "smartphones", "ancient Egypt", "gardening", "sharks",
    "cloud computing", "the water cycle", "friendship", "a first day at school", "camping",
    "the piano", "budget travel", "solar panels", "pizza", "time management", "the ocean tides",
    "bird migration", "cybersecurity", "the Great Wall of China", "vegetarian cooking",
    "mountain climbing", "the immune system", "poetry", "trains", "remote work",
    "the solar system", "cheese making", "electricity", "museums", "running a small shop",
    "learning a new language", "rainbows", "democracy", "glaciers", "yoga", "the internet",
    "board games", "penguins", "writing a novel", "the Renaissance", "nutrition", "robots in "
    "factories", "deserts", "moving to a new city", "the violin", "wind turbines", "owls",
    "personal finance", "the Moon", "spiders", "street food", "architecture", "hurricanes",
    "football", "the history of money", "wolves", "3D printing", "tomatoes", "elephants",
    "the Silk Road", "kindness", "space telescopes", "origami", "bees and flowers",
    "the periodic table", "a rainy afternoon", "city parks", "dragons in folklore",
)
TEMPLATES = (
    "Write a short story about {}.", "Explain {} to a ten-year-old.",
    "Give me five tips about {}.", "Write a short poem about {}.",
    "What are the pros and cons of {}?", "Describe {} in three sentences.",
    "Write a friendly email to a colleague about {}.",
    "Give me step-by-step instructions to get started with {}.",
    "Summarize the history of {}.", "What are common mistakes people make with {}?",
    "Write a short dialogue between two friends about {}.",
    "List some interesting facts about {}.",
)
PERSONAS = ("a curious child", "a university student", "a complete beginner", "a worried parent",
            "a traveller", "a small business owner", "a teacher", "a scientist")
_ASK = "Write one question {} might ask about {}. Reply with the question only."


@dataclass(frozen=True)
class DistillDataConfig:
    """What to generate: ``text_prompts`` built-in prompts (without a prompts file),
    ``synthetic_images`` demo images (each asked IMAGE_QUESTIONS), answer budgets, batch."""

    text_prompts: int = 256
    synthetic_images: int = 0
    max_new_tokens: int = 192
    image_tokens: int = 64
    batch: int = 16
    seed: int = 0

    def __post_init__(self):
        bad = [f"{k}={v}" for k, v in asdict(self).items()
               if v < (0 if k in ("text_prompts", "synthetic_images", "seed") else 1)]
        if bad:
            raise VispecError(f"distill-data settings {', '.join(bad)}. Expected: max_new_tokens, "
                              f"image_tokens and batch >= 1; counts and seed >= 0. Hint: pass "
                              f"positive sizes")


@dataclass(frozen=True)
class Job:
    text: str
    image: str | None  # a file path, "synthetic:<i>", or None
    max_new_tokens: int


# -- prompts ------------------------------------------------------------------------------
def prompt_pool(seed: int) -> list[tuple[str | None, str | None]]:
    """Every built-in prompt slot in a seeded order: ``(instruction, None)`` for a templated
    instruction, ``(None, ask)`` for a question the target writes itself when asked ``ask``."""
    slots = [(t.format(topic), None) for t in TEMPLATES for topic in TOPICS]
    slots += [(None, _ASK.format(p, topic)) for p in PERSONAS for topic in TOPICS]
    order = np.random.default_rng([seed, 22]).permutation(len(slots))
    return [slots[i] for i in order]


def written_question(reply: str) -> str | None:
    """The question in the target's reply to an ``_ASK`` prompt, or None when it wrote
    something else (a first line of one sentence ending in "?", 4-40 words, quotes and
    labels removed; "What a topic! ... What's your question?" is no question)."""
    line = reply.strip().splitlines()[0].strip() if reply.strip() else ""
    line = re.sub(r"^(question|q)\s*[:.]\s*", "", line, flags=re.I).strip(" \"'*`")
    one_sentence = re.search(r"[.!?]\s", line) is None
    return line if line.endswith("?") and one_sentence and 4 <= len(line.split()) <= 40 else None


def _held_out(text: str) -> bool:
    return text.strip().lower() in {p.lower() for p in HELD_OUT_CHAT}


def read_prompts(path: str | os.PathLike) -> list[str]:
    """A prompts file: one prompt per line, blank lines skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise VispecError(f"cannot read the prompts file {path}: {e}. Expected: UTF-8 text, "
                          f"one prompt per line. Hint: check the path") from e
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise VispecError(f"the prompts file {path} holds no prompt. Expected: one prompt per "
                          f"line. Hint: check the file")
    return prompts


def image_files(folder: str | os.PathLike) -> list[Path]:
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) \
        if folder.is_dir() else []
    if not files:
        raise VispecError(f"{folder} holds no image ({', '.join(IMAGE_SUFFIXES)}). Expected: a "
                          f"folder of pictures. Hint: check the --images path")
    return files


def answer_jobs(config: DistillDataConfig, text_prompts: list[str],
                images: list[Path]) -> list[Job]:
    """Image jobs (a user's files, then synthetic images; each asked IMAGE_QUESTIONS), then
    text jobs: what the answer stage generates, in job order."""
    refs = [str(p) for p in images] + [f"{SYNTHETIC}{i}" for i in range(config.synthetic_images)]
    jobs = [Job(q, ref, config.image_tokens) for ref in refs for q in IMAGE_QUESTIONS]
    return jobs + [Job(t, None, config.max_new_tokens) for t in text_prompts]


# -- generation ---------------------------------------------------------------------------
def _sequence_aligned(value: np.ndarray, length: int) -> bool:
    """A processor output laid along the tokens (e.g. Qwen's ``mm_token_type_ids [1, L]``)."""
    return value.ndim == 2 and value.shape == (1, length)


def _collate(prompts: list[Prompt], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded ids, mask and sequence-aligned outputs; other outputs (pixels, grids)
    concatenated along their first axis."""
    width = max(len(p.input_ids) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    out: dict[str, list] = {}
    for row, p in enumerate(prompts):
        n = len(p.input_ids)
        ids[row, width - n:] = torch.from_numpy(p.input_ids)
        mask[row, width - n:] = 1
        for k, v in p.processed.items():
            v = np.asarray(v)
            if _sequence_aligned(v, n):
                v = np.pad(v, ((0, 0), (width - n, 0)))
            out.setdefault(k, []).append(torch.from_numpy(v))
    return {"input_ids": ids, "attention_mask": mask,
            **{k: torch.cat(v) for k, v in out.items()}}


def _groups(prompts: list[Prompt]) -> list[list[int]]:
    """Indices of prompts whose processor outputs can share a batch (same keys and shapes
    past the first axis, e.g. LLaVA-NeXT images of one tiling)."""
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(prompts):
        key = tuple(sorted((k, np.shape(v)[1:] if not _sequence_aligned(np.asarray(v), len(p.input_ids))
                            else "seq") for k, v in p.processed.items()))
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def _eos_ids(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    return {eos} if isinstance(eos, int) else set(eos or [])


@torch.no_grad()
def generate_answers(adapter, prompts: list[Prompt], budgets: list[int]) -> list[list[int]]:
    """Greedy answers (HF ``generate``, batched per compatible group, left-padded), each
    cut after its first EOS and at its budget."""
    model = adapter.model
    eos = _eos_ids(model)
    pad = model.generation_config.pad_token_id
    pad = pad if pad is not None else min(eos)
    answers: list[list[int]] = [[] for _ in prompts]
    for group in _groups(prompts):
        inputs = {k: v.to(model.device) for k, v in
                  _collate([prompts[i] for i in group], pad).items()}
        out = model.generate(**inputs, max_new_tokens=max(budgets[i] for i in group),
                             do_sample=False, pad_token_id=pad)
        for row, i in enumerate(group):
            tokens = out[row, inputs["input_ids"].shape[1]:].tolist()[:budgets[i]]
            end = next((j + 1 for j, t in enumerate(tokens) if t in eos), len(tokens))
            answers[i] = tokens[:end]
    return answers


@torch.no_grad()
def teacher_arrays(adapter, glue: FamilyGlue, prompt: Prompt, answer: list[int],
                   dtype=np.float16) -> dict[str, np.ndarray]:
    """ids, LM-input embeddings, features and ``label_from`` (the prompt length) of prompt +
    answer, from one PyTorch forward over the whole sequence."""
    ids = np.concatenate([prompt.input_ids, np.asarray(answer, np.int64)])
    whole = Prompt(ids, prompt.processed)
    embeds = hf_prompt_embeds(adapter, glue, whole)                  # [L, H]
    _, hidden, _ = hf_lm(adapter, embeds, glue.position_ids(whole)[0])
    return {"ids": ids, "embeds": embeds.cpu().numpy().astype(dtype),
            "features": hidden.float().cpu().numpy().astype(dtype),
            "label_from": np.int64(len(prompt.input_ids))}


# -- the run ------------------------------------------------------------------------------
class _Target:
    """The loaded target (on ``device``) with what building prompts needs."""

    def __init__(self, model_dir, synthetic: int, seed: int, device: torch.device):
        self.adapter, self.glue = load_target(model_dir)
        self.adapter.model.to(device)
        self.processor = load_processor(model_dir)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self._synthetic = examples(synthetic, seed, "train") if synthetic else []

    def prompt(self, job: Job) -> Prompt:
        images = []
        if job.image is not None and job.image.startswith(SYNTHETIC):
            images = [self._synthetic[int(job.image[len(SYNTHETIC):])].image]
        elif job.image is not None:
            with Image.open(job.image) as im:
                images = [im.convert("RGB")]
        return self.glue.prepare(self.processor, job.text, images)


def _run_stage(target: _Target, world: World, folder: Path, jobs: list[Job], batch: int,
               write: Callable[[Path, range, list[Prompt], list[list[int]]], None],
               label: str, progress: Progress) -> None:
    """This rank's missing chunks of ``jobs``: answers generated, ``write`` saves the chunk."""
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".json" if label == "questions" else ".npz"
    mine = [k for k in shards.owned_chunks(len(jobs), batch, world.rank, world.size)
            if not shards.chunk_path(folder, k, suffix).is_file()]
    total = shards.chunk_count(len(jobs), batch)
    done = total - len(shards.missing_chunks(folder, len(jobs), batch, suffix))
    if world.main:
        progress(f"{label}: {done}/{total} chunks of {batch} done before this run; rank "
                 f"{world.rank} of {world.size} computes {len(mine)}")
    tokens, start = 0, time.perf_counter()
    with ProgressBar(label, total, done, enabled=world.main) as bar:
        for k in mine:
            indices = shards.chunk_jobs(k, len(jobs), batch)
            prompts = [target.prompt(jobs[i]) for i in indices]
            answers = generate_answers(target.adapter, prompts,
                                       [jobs[i].max_new_tokens for i in indices])
            write(shards.chunk_path(folder, k, suffix), indices, prompts, answers)
            tokens += sum(map(len, answers))
            rate = tokens / (time.perf_counter() - start)
            finished = total - len(shards.missing_chunks(folder, len(jobs), batch, suffix))
            bar.update(completed=finished, info=f"{rate:.0f} answer tok/s (rank {world.rank})")
    if mine:
        progress(f"{label}: rank {world.rank} wrote {len(mine)} chunks, {tokens} answer tokens "
                 f"({tokens / (time.perf_counter() - start):.1f} tok/s)")


def _model_fingerprint(model_dir: Path) -> str:
    """config.json and the weight files' names and sizes (cheap; not the bytes)."""
    parts = [(model_dir / "config.json").read_text()]
    parts += [f"{p.name}:{p.stat().st_size}" for p in sorted(model_dir.glob("*.safetensors"))]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _text_hash(texts: list[str]) -> str:
    return hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]


def distill_data(model_dir: str | os.PathLike, out: str | os.PathLike,
                 config: DistillDataConfig = DistillDataConfig(), *,
                 prompts: list[str] | None = None, images_dir: str | os.PathLike | None = None,
                 overwrite: bool = False, progress: Progress = lambda msg: None) -> Path:
    """Generate (or finish) the distillation data of the target at ``model_dir`` into
    ``out``: answers to ``prompts`` (default: ``config.text_prompts`` built-in ones) and to
    the pictures of ``images_dir`` and ``config.synthetic_images`` synthetic ones. Every
    rank of a ``torchrun`` / ``accelerate launch`` run calls it the same way. Returns
    ``out`` once every chunk of every rank is written."""
    model_dir, out = Path(model_dir), Path(out)
    read_config(model_dir)  # cheap checks before anything is written
    check_weights(model_dir)
    texts = list(prompts) if prompts is not None else None
    pool = len(prompt_pool(config.seed))
    if texts is None and config.text_prompts > pool:
        raise VispecError(f"{config.text_prompts} built-in text prompts asked for; the built-in "
                          f"set has {pool}. Expected: text_prompts <= {pool}. Hint: pass a "
                          f"prompts file (--prompts) for more")
    images = image_files(images_dir) if images_dir is not None else []
    settings = {**asdict(config), "model": _model_fingerprint(model_dir),
                "prompts": _text_hash(texts) if texts is not None else None,
                "images": [p.name for p in images]}
    start = time.perf_counter()
    with world_group() as world:
        if world.main:
            shards.open_folder(out, settings, overwrite)
        world.barrier()
        if shards.read_settings(out) != settings:
            raise VispecError(f"{out} changed under this run. Hint: run one distill-data per folder")
        target = _Target(model_dir, config.synthetic_images, config.seed, world.device)
        if texts is None:
            texts = _builtin_prompts(target, world, out, config, progress)
        jobs = answer_jobs(config, texts, images)
        if world.main:
            shards.save_json([asdict(j) for j in jobs], out / "prompts.json")

        def write(path, indices, prompts, answers):
            shards.save_arrays([{**teacher_arrays(target.adapter, target.glue, p, a),
                                 "job": np.int64(i)} for i, p, a in zip(indices, prompts, answers)],
                               path)

        _run_stage(target, world, out / "answers", jobs, config.batch, write, "answers", progress)
        world.barrier()
        if world.main:
            shards.remove_partials(out)
            progress(f"distillation data -> {out}: {data_summary(out)} in "
                     f"{shards.chunk_count(len(jobs), config.batch)} chunks "
                     f"({time.perf_counter() - start:.0f}s)")
    return out


def _builtin_prompts(target: _Target, world: World, out: Path, config: DistillDataConfig,
                     progress: Progress) -> list[str]:
    """The first ``config.text_prompts`` slots of ``prompt_pool``; the questions the target
    writes come from a sharded stage of their own (``out/questions``)."""
    slots = prompt_pool(config.seed)[:config.text_prompts]
    asks = [Job(ask, None, QUESTION_TOKENS) for text, ask in slots if text is None]

    def write(path, indices, prompts, answers):
        shards.save_json([target.tokenizer.decode(a, skip_special_tokens=True)
                          for a in answers], path)

    _run_stage(target, world, out / "questions", asks, config.batch, write, "questions", progress)
    world.barrier()
    replies = [r for k in range(shards.chunk_count(len(asks), config.batch))
               for r in json.loads(shards.chunk_path(out / "questions", k, ".json").read_text())]
    written = iter(written_question(r) for r in replies)
    texts = [text if text is not None else next(written) for text, _ in slots]
    kept = [t for t in texts if t is not None and not _held_out(t)]
    if world.main:
        progress(f"built-in prompts: {len(kept)} ({len(slots) - len(kept)} of the questions the "
                 f"target wrote were unusable)")
    return kept


# -- reading ------------------------------------------------------------------------------
def read_data(folder: str | os.PathLike,
              keys: tuple[str, ...] | None = None) -> list[dict[str, np.ndarray]]:
    """Every sequence of a finished ``distill_data`` folder, in job order (only the arrays
    named ``keys``, if given); a clear error for an unfinished one."""
    folder = Path(folder)
    settings = shards.read_settings(folder)
    jobs = json.loads((folder / "prompts.json").read_text()) \
        if (folder / "prompts.json").is_file() else None
    missing = shards.missing_chunks(folder / "answers", len(jobs), settings["batch"]) \
        if jobs is not None else ["all"]
    if missing:
        raise VispecError(f"the distillation data in {folder} is unfinished ({len(missing)} "
                          f"chunks missing). Expected: a finished distill-data run. Hint: rerun "
                          f"the same distill-data command to finish it")
    out = []
    for k in range(shards.chunk_count(len(jobs), settings["batch"])):
        out += shards.load_arrays(shards.chunk_path(folder / "answers", k), keys)
    return out


def data_summary(folder: str | os.PathLike) -> dict[str, int]:
    """Sequences and answer tokens of a finished data folder, image answers among them."""
    jobs = json.loads((Path(folder) / "prompts.json").read_text())
    summary = {"sequences": 0, "answer_tokens": 0, "image_answer_tokens": 0}
    for a in read_data(folder, ("ids", "label_from", "job")):
        answer = len(a["ids"]) - int(a["label_from"])
        summary["sequences"] += 1
        summary["answer_tokens"] += answer
        if jobs[int(a["job"])]["image"] is not None:
            summary["image_answer_tokens"] += answer
    return summary
