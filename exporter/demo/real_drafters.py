"""Drafters for the SmolLM2 LLaVA target: shipped with the package, or trained briefly.

    shipped : assets/drafters/<kind>/ (config.json, model.safetensors in float16 without the
              target's embedding table, token_counts.json) and assets/drafters/recipe.json;
              reproduce with ``python -m vispec.exporter.demo.real_drafters --write-weights``
              (also under ``torchrun --nproc_per_node N``: every stage split over the ranks)
    recipe  : distill-data (built-in text prompts of many kinds + synthetic images asked a
              short and a detailed description) -> train-drafter per kind (``Recipe.rounds``
              of stage 1 then stage 2) -> float16 files;
              its work under ``cache_dir()/smollm2-llava/recipe-v<VERSION>/``: text answers
              (any vision weights), image answers (per vision weights), held-out chat
              answers, checkpoints (per settings), each folder keyed by what shapes it
    --train : the demo's short run (DistillConfig: 96 images, 64 questions, 300 steps, then
              100 steps on the levels it drafts),
              data and checkpoints cached under ``cache_dir()/smollm2-llava/``
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from vispec.runtime.atomic import atomic_output_dir
from vispec.runtime.cache import cache_dir

from ..drafters.distill import HELD_OUT_CHAT
from ..settings import check_fields
from .real_target import WEIGHTS as VISION_WEIGHTS

if TYPE_CHECKING:
    from ..drafters.train import TrainConfig

Progress = Callable[[str], None]
KINDS = ("vispec", "hivis", "eagle")
VERSION = 2  # bump when the data or training recipe changes
DRAFTER_ASSETS = Path(__file__).parent / "assets" / "drafters"
RECIPE_FILE = "recipe.json"
_SHIPPED_FILES = ("config.json", "model.safetensors", "token_counts.json")
_TOPICS = ("the sun", "rain", "a cat", "a dog", "the sea", "a forest", "a city", "a river",
           "bread", "coffee", "a bicycle", "a train", "music", "the moon", "winter", "summer",
           "a garden", "a library", "mountains", "a school", "the wind", "an apple", "a bird",
           "a computer", "the stars", "a farm", "a bridge", "fire", "snow", "a market")
_TEMPLATES = ("What is {}?", "Describe {} in one sentence.", "Write a short poem about {}.",
              "Give me two facts about {}.", "Why do people like {}?")


@dataclass(frozen=True)
class DistillConfig:
    """Data and training settings of the demo's short in-demo training (``--train``)."""

    image_prompts: int = 96
    text_prompts: int = 64
    image_tokens: int = 24   # new tokens per image answer (they end at EOS, ~11 tokens)
    text_tokens: int = 48
    steps: int = 300
    batch: int = 4
    lr: float = 1e-3
    seed: int = 0
    unroll: int = 3          # then, as the recipe's stage 2: the levels the drafter drafts
    unroll_steps: int = 100
    unroll_lr: float = 3e-4

    def __post_init__(self):
        check_fields(self, "every field > 0",
                     (lambda v: v > 0, [f.name for f in dataclasses.fields(self) if f.name != "seed"]))

    def key(self, fields: tuple[str, ...], extra: str = "") -> str:
        """A short hash of ``fields``' values, ``VERSION`` and ``extra`` (the weights' hash)."""
        values = {k: getattr(self, k) for k in fields}
        text = json.dumps({**values, "version": VERSION, "extra": extra}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Recipe:
    """The shipped drafters' recipe: distillation data, then each kind trained on it."""

    text_prompts: int = 2000     # every built-in slot (~180 answer tokens each; ~290 dropped)
    synthetic_images: int = 640  # each asked a short and a detailed description
    max_new_tokens: int = 192
    image_tokens: int = 64
    generate_batch: int = 16
    steps: int = 1200   # ~2 passes over the training set (at 400 the loss still fell steeply)
    batch: int = 8
    lr: float = 1e-3
    train_vocab: int = 8192  # the loss over these most frequent answer tokens (demo: 4096)
    seed: int = 0
    unroll: int = 3        # then levels trained per row from the drafter's own hidden states
    unroll_steps: int = 300
    unroll_lr: float = 3e-4
    """Stage 2 (training-time test, ``TrainConfig.unroll``): from stage 1's checkpoint, on the
    same data. Stage 1 alone learns each row teacher-forced and the drafter drafts deeper
    levels from its own hidden states: on the demo's images the 2nd drafted word (shape,
    position) missed in almost every round (chain (4,3,1): 2.61 tokens per pass); after 150
    such steps 3.78."""
    image_repeats: int = 2
    """Copies of the image answers in the training set. The loss is a mean over answer
    rows, and an image answer is short (~9 tokens; detailed, 39) beside ~180-token text
    answers: with the detailed answers, twice each makes image rows ~17% of the loss.
    Measured when both questions had the ~9-token answer (~11% once, ~20% twice): ViSpec at
    1200 steps, fixed tree (30, 5, 8), tokens per pass on 32 held-out images / 10 held-out
    chat prompts: 2.96 / 1.90 once, 3.25 / 1.86 twice."""
    rounds: int = 2
    round_steps: int = 1500
    round_lr: float = 5e-4
    """Each round after the first continues the last checkpoint with ``round_steps`` more
    stage-1 steps at ``round_lr`` (seed + round), then stage 2 again. After one round the
    drafters had not fitted their own training text (top-1 0.62 on it, still rising at step
    1200): the second round took their held-out chat top-1 from 0.39-0.41 to 0.43-0.45 and
    short image answers under ``auto`` from 4.0 to 4.9-6.4 tokens a pass."""

    def __post_init__(self):
        check_fields(self, "training settings > 0 (rounds >= 1)", (lambda v: v > 0, [
            "steps", "batch", "lr", "unroll", "unroll_steps", "unroll_lr", "image_repeats",
            "rounds", "round_steps", "round_lr"]))


_DATA_FIELDS = ("image_prompts", "text_prompts", "image_tokens", "text_tokens", "seed")
_TRAIN_FIELDS = ("steps", "batch", "lr", "seed")
# stage 2's fields in DistillConfig and Recipe (``TrainConfig.unroll``, ``_stage2_config``)
_UNROLL_FIELDS = ("unroll", "unroll_steps", "unroll_lr")
_ROUND_FIELDS = ("rounds", "round_steps", "round_lr")  # the Recipe's later rounds
# Recipe fields that shape the text and the image answers (the rest shape the training):
# a run with new training settings or new vision weights reuses what it can
_RECIPE_TEXT = ("text_prompts", "max_new_tokens", "generate_batch", "seed")
_RECIPE_IMAGES = ("synthetic_images", "image_tokens", "generate_batch", "seed")


def _stage2_config(train, settings: "DistillConfig | Recipe"):
    """Stage 2's ``TrainConfig``: ``train`` continued on the levels the drafter drafts,
    with ``settings``' unroll, unroll_steps and unroll_lr."""
    return replace(train, steps=settings.unroll_steps, lr=settings.unroll_lr,
                   unroll=settings.unroll)


def text_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` questions drawn from the fixed templates x topics (deterministic)."""
    rng = np.random.default_rng([seed, 7])
    pairs = [(t, p) for t in _TEMPLATES for p in _TOPICS]
    order = rng.permutation(len(pairs))
    return [pairs[i][0].format(pairs[i][1]) for i in order[:n]]


def held_out_text_prompts() -> list[str]:
    """The demo's text prompts: its two questions and eight ordinary chat prompts, absent
    from ``text_prompts`` and from distill-data's built-in prompts (never trained on)."""
    return list(HELD_OUT_CHAT)


def file_hash(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]


# -- the short in-demo training -----------------------------------------------------------
def cache_folder(model_dir: str | os.PathLike, config: DistillConfig) -> Path:
    """Where the distillation data of ``config`` for this target's weights lives (the
    checkpoints in subfolders keyed by the training settings)."""
    weights = Path(model_dir) / "model.safetensors"
    extra = file_hash(weights) if weights.is_file() else str(Path(model_dir).resolve())
    return Path(cache_dir()) / "smollm2-llava" / f"distill-{config.key(_DATA_FIELDS, extra)}"


def real_drafters(model_dir: str | os.PathLike, kinds: tuple[str, ...] = KINDS,
                  config: DistillConfig = DistillConfig(),
                  progress: Progress = lambda msg: None) -> dict[str, Path]:
    """Checkpoint folders (official layout) of ``kinds`` trained briefly for the target at
    ``model_dir``: cached ones reused, the others trained now (data cached too)."""
    from vispec.runtime.families import glue_for
    from vispec.runtime.model_dir import read_config

    from ..drafters.checkpoint import load_drafter, new_drafter, write_checkpoint
    from ..drafters.distill import DistillDataConfig, distill_data
    from ..drafters.export import target_lm_head
    from ..drafters.train import TrainConfig, fit, load_samples, save_token_counts

    folder = cache_folder(model_dir, config)
    first = {kind: folder / f"{kind}-{config.key(_TRAIN_FIELDS)}" for kind in kinds}
    wanted = {kind: folder / f"{kind}-{config.key(_TRAIN_FIELDS + _UNROLL_FIELDS)}-unrolled"
              for kind in kinds}
    missing = [k for k, p in wanted.items() if not (p / "config.json").is_file()]
    if not missing:
        progress(f"drafters {', '.join(kinds)}: cached ({folder})")
        return wanted
    data = distill_data(model_dir, folder / "data", DistillDataConfig(
        synthetic_images=config.image_prompts, max_new_tokens=config.text_tokens,
        image_tokens=config.image_tokens, seed=config.seed),
        prompts=text_prompts(config.text_prompts, config.seed), progress=progress)
    samples = load_samples(data)
    glue = glue_for(read_config(model_dir))
    lm_head = target_lm_head(model_dir)
    train = TrainConfig(steps=config.steps, lr=config.lr, batch=config.batch, seed=config.seed)

    def fit_into(out: Path, drafter, settings: TrainConfig, kind: str):
        progress(f"training the {kind} drafter ({settings.steps} steps of {settings.batch} "
                 f"sequences, {settings.unroll} level(s) each)")
        metrics = fit(drafter, lm_head, glue, samples, settings,
                      lambda m: progress(f"  {kind} {m}"))
        with atomic_output_dir(out, overwrite=True) as tmp:
            write_checkpoint(drafter, tmp)
            save_token_counts(tmp, samples, drafter.config.vocab_size)
        return metrics

    for kind in missing:
        start = time.perf_counter()
        if not (first[kind] / "config.json").is_file():
            fit_into(first[kind], new_drafter(kind, model_dir, config.seed), train, kind)
        metrics = fit_into(wanted[kind], load_drafter(first[kind], model_dir),
                           _stage2_config(train, config), kind)
        progress(f"{kind} drafter trained in {time.perf_counter() - start:.0f}s "
                 f"(training top-1 {metrics.top1:.2f}) -> {wanted[kind]}")
    return wanted


# -- shipped drafters ---------------------------------------------------------------------
def shipped_drafters(kinds: tuple[str, ...] = KINDS,
                     folder: Path = DRAFTER_ASSETS) -> dict[str, Path] | None:
    """The shipped checkpoint folders of ``kinds`` (the target's embedding table is filled
    in at load), or None when some are missing or were trained for other vision weights."""
    recipe = folder / RECIPE_FILE
    if not recipe.is_file() or not VISION_WEIGHTS.is_file():
        return None
    if json.loads(recipe.read_text()).get("vision_weights") != file_hash(VISION_WEIGHTS):
        return None
    found = {kind: folder / kind for kind in kinds}
    if not all((p / name).is_file() for p in found.values() for name in _SHIPPED_FILES):
        return None
    return found


def demo_drafters(model_dir: str | os.PathLike, kinds: tuple[str, ...] = KINDS, *,
                  train: bool = False, config: DistillConfig = DistillConfig(),
                  progress: Progress = lambda msg: None) -> dict[str, Path]:
    """The shipped drafters, unless ``train`` (or none fit the shipped vision weights):
    then the short in-demo training's (``real_drafters``)."""
    shipped = None if train else shipped_drafters(kinds)
    if shipped is not None:
        progress(f"drafters {', '.join(kinds)}: shipped ({DRAFTER_ASSETS}, recipe in "
                 f"{RECIPE_FILE})")
        return shipped
    if not train:
        progress("no shipped drafters for these vision weights (reproduce them with `python -m "
                 "vispec.exporter.demo.real_drafters --write-weights`): training short ones")
    return real_drafters(model_dir, kinds, config, progress)


def pack_drafter(checkpoint: Path, out: Path) -> Path:
    """A trained checkpoint as shipped: float16 weights without ``embed_tokens`` (the
    target's, filled in at load), config.json and token_counts.json."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    state = load_file(str(checkpoint / "model.safetensors"))
    save_file({k: v.half().contiguous() for k, v in state.items()
               if not k.startswith("embed_tokens")}, str(out / "model.safetensors"))
    for name in ("config.json", "token_counts.json"):
        shutil.copyfile(checkpoint / name, out / name)
    return out


def write_weights(out: Path = DRAFTER_ASSETS, recipe: Recipe = Recipe(),
                  work: Path | None = None, kinds: tuple[str, ...] = KINDS,
                  progress: Progress = lambda msg: None) -> Path:
    """Run ``recipe`` (every rank of a torchrun run calls it alike) and write the shipped
    drafters and ``recipe.json`` into ``out`` (rank 0, atomically). ``work`` keeps the data
    and checkpoints (default: the cache), so a killed run resumes."""
    from vispec.runtime.families import glue_for
    from vispec.runtime.model_dir import read_config

    from ..artifacts import versions
    from ..drafters.checkpoint import load_drafter
    from ..drafters.distill import DistillDataConfig, data_summary, distill_data
    from ..drafters.distributed import world_group
    from ..drafters.export import target_lm_head
    from ..drafters.train import LOG_FILE, evaluate, load_samples, train_drafter
    from .real_target import cached_target

    start = time.perf_counter()
    folders = recipe_folders(recipe, work)
    with world_group() as world:
        if world.main:  # built once (the others would race to build the same folder)
            cached_target(progress)
        world.barrier()
        model_dir = cached_target(progress)
        data = distill_recipe(model_dir, recipe, folders, progress=progress)
        held_out = distill_data(model_dir, folders.held_out, DistillDataConfig(
            synthetic_images=0, max_new_tokens=recipe.max_new_tokens, batch=len(HELD_OUT_CHAT)),
            prompts=list(HELD_OUT_CHAT), progress=progress)
        sets = data[:1] + data[1:] * recipe.image_repeats
        for kind in kinds:
            init = None
            for folder, config in folders.stages:
                if not (folder / kind / "config.json").is_file():
                    train_drafter(model_dir, folder / kind, kind=None if init else kind,
                                  init_dir=init, config=config, data=sets, progress=progress)
                init = folder / kind
        if not world.main:
            return out
    check = load_samples(held_out)
    glue, lm_head = glue_for(read_config(model_dir)), target_lm_head(model_dir)
    summaries = [data_summary(d) for d in data]
    record = {"recipe": asdict(recipe), "version": VERSION, "processes": world.size,
              "vision_weights": file_hash(VISION_WEIGHTS),
              "data": {k: sum(d[k] for d in summaries) for k in summaries[0]},
              "versions": versions(), "drafters": {}, "seconds": 0}
    with atomic_output_dir(out, overwrite=True) as tmp:
        for kind in kinds:
            logs = [json.loads((f / kind / LOG_FILE).read_text()) for f, _ in folders.stages]
            final = folders.stages[-1][0] / kind
            held = evaluate(load_drafter(final, model_dir), lm_head, glue, check)
            record["drafters"][kind] = {
                "final_loss": float(np.mean(logs[-1]["loss"][-50:])),  # levels 0..unroll-1
                "final_top1": float(np.mean(logs[-1]["top1"][-50:])),  # level 0
                "held_out_chat_top1": held.top1,
                "train_seconds": sum(log["seconds"] for log in logs),
                "bytes": pack_drafter(final, tmp / kind).joinpath(
                    "model.safetensors").stat().st_size}
            progress(f"{kind}: {record['drafters'][kind]}")
        record["seconds"] = round(time.perf_counter() - start)
        (tmp / RECIPE_FILE).write_text(json.dumps(record, indent=1))
    progress(f"shipped drafters -> {out} ({record['seconds']}s)")
    return out


@dataclass(frozen=True)
class RecipeFolders:
    """Where a recipe's run keeps its work: the text answers (the LM's alone: any vision
    weights), the image answers of these vision weights, the held-out chat answers, and
    each training stage in order, its checkpoints' folder and its ``TrainConfig``: stage 1
    and stage 2 (``_stage2_config``), then both again for each later round
    (``Recipe.rounds``), each continuing the stage before. Every folder is keyed by the
    settings that shape it."""

    text: Path
    images: Path
    held_out: Path
    stages: tuple[tuple[Path, TrainConfig], ...]


def recipe_folders(recipe: Recipe, work: Path | None = None) -> RecipeFolders:
    """The folders of ``recipe`` under ``work`` (default: the cache): a run with new
    training settings or new vision weights reuses the data it can, a later round's folder
    changes with any setting before it."""
    from ..drafters.train import TrainConfig

    settings, vision = asdict(recipe), file_hash(VISION_WEIGHTS)

    def key(fields, *extra) -> str:
        values = [{k: settings[k] for k in fields}, VERSION, *extra]
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]

    work = Path(work or Path(cache_dir()) / "smollm2-llava" / f"recipe-v{VERSION}")
    trained = tuple(k for k in settings if k not in _ROUND_FIELDS)  # what shapes round 1
    stage1 = tuple(k for k in trained if k not in _UNROLL_FIELDS)
    later = tuple(k for k in settings if k != "rounds")  # round r: these and r
    first = TrainConfig(steps=recipe.steps, batch=recipe.batch, lr=recipe.lr,
                        vocab=recipe.train_vocab, seed=recipe.seed)
    stages = ((work / f"train-{key(stage1, vision)}", first),
              (work / f"unrolled-{key(trained, vision)}", _stage2_config(first, recipe)))
    for r in range(2, recipe.rounds + 1):
        more = replace(first, steps=recipe.round_steps, lr=recipe.round_lr,
                       seed=recipe.seed + r - 1)
        stages += ((work / f"round{r}-{key(later, vision, r)}", more),
                   (work / f"round{r}-unrolled-{key(later, vision, r)}",
                    _stage2_config(more, recipe)))
    return RecipeFolders(work / f"text-{key(_RECIPE_TEXT)}",
                         work / f"images-{key(_RECIPE_IMAGES, vision)}",
                         work / f"held-out-{key(('max_new_tokens',))}", stages)


def distill_recipe(model_dir: Path, recipe: Recipe, folders: RecipeFolders, *,
                   parts: tuple[str, ...] = ("text", "images"),
                   progress: Progress = lambda msg: None) -> list[Path]:
    """The recipe's distillation data (every rank calls it alike): the built-in text prompts'
    answers, then the synthetic images' (each asked both questions)."""
    from ..drafters.distill import DistillDataConfig, distill_data

    common = dict(batch=recipe.generate_batch, seed=recipe.seed)
    jobs = {"text": (folders.text, DistillDataConfig(
                text_prompts=recipe.text_prompts, synthetic_images=0,
                max_new_tokens=recipe.max_new_tokens, **common), None),
            "images": (folders.images, DistillDataConfig(
                text_prompts=0, synthetic_images=recipe.synthetic_images,
                image_tokens=recipe.image_tokens, **common), [])}
    return [distill_data(model_dir, jobs[p][0], jobs[p][1], prompts=jobs[p][2], progress=progress)
            for p in parts]


def _recipe_from_args(args: argparse.Namespace) -> Recipe:
    return Recipe(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Recipe)})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Reproduce the shipped demo drafters (also "
                                                 "under torchrun --nproc_per_node N).")
    parser.add_argument("--write-weights", type=Path, nargs="?", const=DRAFTER_ASSETS,
                        required=True, help="output folder (default: the package's assets)")
    parser.add_argument("--work", type=Path, default=None,
                        help="data and checkpoints (default: the cache); rerun to resume")
    parser.add_argument("--kinds", default=",".join(KINDS))
    for field in dataclasses.fields(Recipe):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default),
                            default=field.default)
    args = parser.parse_args()
    try:
        recipe = _recipe_from_args(args)
    except ValueError as e:
        parser.error(str(e))  # exit code 2
    write_weights(args.write_weights, recipe, args.work, tuple(args.kinds.split(",")),
                  progress=print)
