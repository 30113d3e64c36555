"""EAGLE-style self-distillation: train a drafter to predict its own target.

    data : random word prompts (half with a noise image) -> the target decodes a continuation,
           or the chunks of a ``distill-data`` folder (``distill.py``); per sequence:
           ids [L], LM-input embeddings e [L,H], features f [L,H], logits [L,V]
    rows : the drafter's full-sequence forward in the runtime's row layout (reference.py:
           EAGLE shift, ViSpec image compression, HiViS image removal)
    loss : row r pairs f_s with e_n (n = the next token the row sees, s + 1 or the next text
           token) and learns  CE(lm_head(hidden_r), softmax(logits_n))
                              + feature_weight * smooth_l1(hidden_r, f_n)
           ``unroll`` U > 1 (training-time test, as EAGLE-3 / HASS): also tree levels
           1..U-1 as the runtime drafts them, row r at level l fusing its level l-1 hidden
           state with e_{n+l}, at position p_r + l, attending to rows <= r and its own
           earlier levels; the loss is the mean over levels
Frozen: ``embed_tokens`` (the target's copy) and the target's lm_head.

Scale-out: under ``torchrun`` / ``accelerate launch`` each rank takes its share of every
global batch (the same draws on every rank) inside DistributedDataParallel, its loss scaled
so that the averaged gradient is the one process's gradient of the same global batch.
``RunOptions.state_dir`` holds a resumable training state (weights, Adam, schedule, draws);
CUDA runs autocast in bf16 (fp16 with a gradient scaler where bf16 is missing).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from vispec.runtime.atomic import atomic_output_dir
from vispec.runtime.errors import VispecError
from vispec.runtime.families import FamilyGlue, Prompt, glue_for
from vispec.runtime.model_dir import read_config
from vispec.runtime.processors import load_processor

from ..loading import load_target, read_text_weight
from ..reference import hf_lm, hf_prompt_embeds
from .checkpoint import drafter_config, load_drafter, new_drafter, write_checkpoint
from .distributed import World, env_world, world_group
from .draft_vocab import choose_draft_vocab, count_tokens, save_counts
from .modules import Drafter
from .progress import ProgressBar
from .reference import drafter_rows

Progress = Callable[[str], None]
_WORDS = ("the a red blue green small big old new cat dog boat car tree house man woman child "
          "bird sky water road city park table cup book picture image photo left right near "
          "under over next to and with is are sits runs looks holds shows describe what how "
          "many where colour there people two three bright dark quiet busy morning night "
          "street field garden kitchen window door train horse").split()
_IMAGE_SIZE = 56


@dataclass(frozen=True)
class TrainConfig:
    """Distillation settings; ``temperature`` 0 decodes the data greedily. ``vocab`` N > 0:
    the logit loss over the N most frequent answer tokens of the data only (export with
    ``--draft-vocab`` <= N; the head's share of a step shrinks by V/N)."""

    steps: int = 1000
    lr: float = 3e-3
    sequences: int = 512
    new_tokens: int = 48
    temperature: float = 0.0
    feature_weight: float = 0.1
    seed: int = 0
    with_images: bool = True
    batch: int = 4  # sequences per optimiser step
    vocab: int = 0
    unroll: int = 1  # levels trained per row: 1 teacher-forced, then on its own hidden states

    def __post_init__(self):
        problems = [f"{name}={getattr(self, name)}" for name in ("steps", "sequences",
                    "new_tokens", "batch", "unroll") if getattr(self, name) < 1]
        problems += [f"{name}={getattr(self, name)}" for name in ("temperature",
                     "feature_weight", "vocab") if getattr(self, name) < 0]
        problems += [f"lr={self.lr}"] if not self.lr > 0 else []
        if problems:
            raise ValueError(f"TrainConfig | {', '.join(problems)}. Expected: steps, sequences, "
                             f"new_tokens, batch, unroll >= 1; lr > 0; temperature, feature_weight, "
                             f"vocab >= 0")


@dataclass(frozen=True)
class Sample:
    """One decoded sequence (prompt + continuation) as the target saw it."""

    ids: np.ndarray          # [L] int64
    embeds: torch.Tensor     # [L, H] LM-input embeddings (image features placed)
    features: torch.Tensor   # [L, H] final post-norm hidden states
    logits: torch.Tensor | None = None  # [L, V]; None: lm_head(features), computed per use
    label_from: int = 0      # rows that see a token before this index are not labelled


@dataclass(frozen=True)
class RunOptions:
    """How a training run executes (not what it computes): a resumable state folder saved
    every ``save_every`` steps (0: never; ``train_drafter``'s default folder is
    ``.NAME.train-state`` beside its output), and the precision (``auto``: bf16 autocast on
    CUDA, fp16 + gradient scaling where bf16 is missing; float32 on the CPU)."""

    state_dir: Path | None = None
    save_every: int = 50
    precision: str = "auto"

    def __post_init__(self):
        if self.precision not in PRECISIONS or self.save_every < 0:
            raise VispecError(f"precision={self.precision!r}, save_every={self.save_every}. "
                              f"Expected: precision one of {PRECISIONS}, save_every >= 0. Hint: "
                              f"leave them at their defaults")


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
STATE_FILE = "state.pt"
LOG_FILE = "train_log.json"  # beside a trained checkpoint: settings and per-step loss, top-1


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


def load_samples(folder: str | os.PathLike) -> list[Sample]:
    """The sequences of a finished ``distill-data`` folder (e and f stored in float16,
    returned in float32)."""
    from .distill import read_data

    return [Sample(a["ids"], torch.from_numpy(a["embeds"]).float(),
                   torch.from_numpy(a["features"]).float(), label_from=int(a["label_from"]))
            for a in read_data(folder)]


# -- loss ---------------------------------------------------------------------------------
def target_logits(sample: Sample, lm_head_weight: torch.Tensor, rows) -> torch.Tensor:
    """The target's logits ``[M, V]`` at ``rows`` (stored, or its LM head on the features)."""
    if sample.logits is not None:
        return sample.logits[rows]
    return sample.features[rows] @ lm_head_weight.T


def fused_rows(drafter: Drafter, glue: FamilyGlue, sample: Sample,
               lm_head_weight: torch.Tensor):
    """The runtime's decoder-layer inputs ``[N, H]``, positions ``[N]`` and ViSpec's global
    feature (else None) over a whole sequence, as ``reference_prefill`` builds them (with
    gradients)."""
    last = target_logits(sample, lm_head_weight, slice(-1, None))
    x_next = drafter.embed_tokens(last.argmax(-1))  # [1, H]
    return drafter_rows(drafter, glue, sample.ids, sample.embeds, sample.features, x_next)


def _shifted_next(glue: FamilyGlue, ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """EAGLE/ViSpec: the row at position p sees x_{p+1}; image rows are unlabelled."""
    nxt = positions + 1
    valid = nxt < len(ids)
    valid[valid] = ids[nxt[valid]] != glue.image_token_id
    return np.where(valid, nxt, -1)


def _hivis_next(glue: FamilyGlue, ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """HiViS: row r sees the next kept (text) token."""
    kept, _ = glue.hivis_text_rows(ids)
    return np.append(kept[1:], -1)


# kind -> (glue, ids [L], row positions [N]) -> [N] index of the token each row sees next
# (its label: the target's logits and feature there), -1 for none
_NEXT_TOKEN = {"eagle": _shifted_next, "vispec": _shifted_next, "hivis": _hivis_next}


@dataclass(frozen=True)
class HeadRows:
    """Some rows of the LM head: token ``ids [N]`` and their ``weight [N, H]``."""

    ids: torch.Tensor
    weight: torch.Tensor


def sample_loss(drafter: Drafter, lm_head_weight: torch.Tensor, glue: FamilyGlue,
                sample: Sample, feature_weight: float, head: HeadRows | None = None,
                unroll: int = 1) -> tuple[torch.Tensor, int, int]:
    """(loss, rows whose top-1 is the target's, labelled rows) of one sequence: the mean
    over ``unroll`` tree levels of each level's mean row loss; top-1 and rows of level 0
    (teacher-forced). The logits over ``head``'s tokens only when given."""
    weight = lm_head_weight if head is None else head.weight
    losses = []
    for level, hidden, seen in level_rows(drafter, glue, sample, lm_head_weight, unroll):
        keep, nxt = torch.as_tensor(seen >= 0), seen[seen >= 0]
        if head is None:
            target = target_logits(sample, lm_head_weight, nxt)             # [M, V]
        elif sample.logits is None:
            target = target_logits(sample, head.weight, nxt)                # [M, N]
        else:
            target = sample.logits[nxt][:, head.ids]
        logp = torch.log_softmax(hidden[keep] @ weight.T, dim=-1)
        ce = -(torch.softmax(target, -1) * logp).sum(-1).mean()
        reg = torch.nn.functional.smooth_l1_loss(hidden[keep], sample.features[nxt])
        losses.append(ce + feature_weight * reg)
        if level == 0:
            agree, labelled = int((logp.argmax(-1) == target.argmax(-1)).sum()), len(nxt)
    return sum(losses) / len(losses), agree, labelled


def level_rows(drafter: Drafter, glue: FamilyGlue, sample: Sample,
               lm_head_weight: torch.Tensor, unroll: int = 1):
    """Per tree level 0..``unroll``-1 (while any row is labelled there): (level, the
    drafter's hidden states ``[N, H]``, the index of the token each row's node sees there or
    -1). Level 0 is the teacher-forced prefill; at level l row r fuses its level l-1 hidden
    state with e_{n+l} at position p_r + l and attends to rows <= r and its own earlier
    levels: the chain the runtime drafts from row r as the root."""
    fused, positions, g = fused_rows(drafter, glue, sample, lm_head_weight)
    n, c = len(fused), drafter.config
    first = _NEXT_TOKEN[drafter.kind](glue, sample.ids, positions.cpu().numpy())
    causal, own = torch.ones(n, n).tril().bool(), torch.eye(n).bool()
    past_k = past_v = torch.zeros(1, 0, c.kv_heads, c.head_dim)
    rows, hidden = fused, None  # level l's input rows; level l-1's hidden states
    for level in range(unroll):
        seen = _level_tokens(glue, sample, first, level)
        if level:  # the row's own hidden state of the level before, with x_seen
            if not (seen >= 0).any():
                return
            embeds = sample.embeds[np.maximum(seen, 0)]
            rows = drafter.fuse(embeds[None], hidden[None], drafter.level_extra(level, g))[0]
        mask = torch.cat([causal] + [own] * level, dim=1)
        out, k, v = drafter.layer(rows[None], (positions + level)[None], mask[None, None],
                                  past_k, past_v)
        hidden, past_k, past_v = out[0], torch.cat([past_k, k], 1), torch.cat([past_v, v], 1)
        yield level, hidden, seen


def _level_tokens(glue: FamilyGlue, sample: Sample, first: np.ndarray, level: int) -> np.ndarray:
    """Per row, the index of the token its level-``level`` node sees (``first`` + level),
    -1 where that is no labelled text token of the sequence."""
    seen = np.where(first >= 0, first + level, -1)
    valid = (seen >= sample.label_from) & (seen < len(sample.ids))
    valid[valid] = sample.ids[seen[valid]] != glue.image_token_id
    return np.where(valid, seen, -1)


@torch.no_grad()
def evaluate(drafter: Drafter, lm_head_weight: torch.Tensor, glue: FamilyGlue,
             samples: list[Sample], feature_weight: float = 0.1) -> Metrics:
    """Mean loss and top-1 agreement with the target over ``samples``."""
    return _summary([sample_loss(drafter, lm_head_weight, glue, s, feature_weight)
                     for s in samples])


def _summary(results: list[tuple[torch.Tensor, int, int]]) -> Metrics:
    """Row-weighted means of (mean loss, agreeing rows, rows) results."""
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


class BatchLoss(torch.nn.Module):
    """A rank's part of a batch: (summed row losses, rows whose top-1 is the target's,
    labelled rows). The module DistributedDataParallel wraps."""

    def __init__(self, drafter: Drafter, lm_head_weight: torch.Tensor, glue: FamilyGlue,
                 feature_weight: float, head: HeadRows | None = None, unroll: int = 1):
        super().__init__()
        self.drafter, self.glue, self.feature_weight = drafter, glue, feature_weight
        self.lm_head_weight, self.head = lm_head_weight, head  # frozen, equal on every rank
        self.unroll = unroll

    def forward(self, samples: list[Sample]) -> tuple[torch.Tensor, int, int]:
        results = [sample_loss(self.drafter, self.lm_head_weight, self.glue, s,
                               self.feature_weight, self.head, self.unroll) for s in samples]
        return (sum(loss * count for loss, _, count in results),
                sum(a for _, a, _ in results), sum(c for _, _, c in results))


def _on(sample: Sample, device: torch.device) -> Sample:
    """``sample`` with its tensors on ``device``."""
    def move(t):
        return None if t is None else t.to(device)
    return Sample(sample.ids, move(sample.embeds), move(sample.features), move(sample.logits),
                  sample.label_from)


def _autocast(precision: str, device: torch.device):
    """(autocast context, gradient scaler or None) for ``precision`` on ``device``."""
    if device.type != "cuda":
        if precision not in ("auto", "fp32"):
            raise VispecError(f"precision {precision} needs CUDA; this run is on the CPU. "
                              f"Expected: auto or fp32. Hint: leave --precision at auto")
        return nullcontext(), None
    if precision == "fp32":
        return nullcontext(), None
    bf16 = precision == "bf16" or (precision == "auto" and torch.cuda.is_bf16_supported())
    dtype = torch.bfloat16 if bf16 else torch.float16
    scaler = None if bf16 else torch.amp.GradScaler("cuda")
    return torch.autocast("cuda", dtype=dtype), scaler


@dataclass
class _State:
    """Everything a resumed run needs to continue exactly where the saved one was."""

    step: int
    rng: dict
    window: list   # (loss, agreeing rows, rows) per step since the last report
    history: list  # (loss, top-1) per step

    @classmethod
    def fresh(cls, seed: int) -> "_State":
        return cls(0, np.random.default_rng(seed).bit_generator.state, [], [])


def _save_state(path: Path, state: _State, drafter: Drafter, optimizer, schedule, scaler,
                config: TrainConfig) -> None:
    path.mkdir(parents=True, exist_ok=True)
    weights = {k: v for k, v in drafter.state_dict().items() if not k.startswith("embed_tokens")}
    tmp = path / f".{STATE_FILE}.partial"
    torch.save({**asdict(state), "drafter": weights, "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "config": asdict(config)}, tmp)
    os.replace(tmp, path / STATE_FILE)


def _load_state(path: Path, drafter: Drafter, optimizer, schedule, scaler,
                config: TrainConfig, device: torch.device) -> _State | None:
    """The saved state (loaded into the drafter, optimiser, schedule), or None for none."""
    file = path / STATE_FILE
    if not file.is_file():
        return None
    saved = torch.load(file, map_location=device, weights_only=False)
    if saved["config"] != asdict(config):
        raise VispecError(f"{path} holds the state of a run with other settings "
                          f"({saved['config']}). Expected: {asdict(config)}. Hint: pass the same "
                          f"options to resume, or delete {path} to start over")
    drafter.load_state_dict(saved["drafter"], strict=False)
    optimizer.load_state_dict(saved["optimizer"])
    schedule.load_state_dict(saved["schedule"])
    if scaler is not None and saved["scaler"] is not None:
        scaler.load_state_dict(saved["scaler"])
    return _State(saved["step"], saved["rng"], saved["window"], saved["history"])


def fit(drafter: Drafter, lm_head_weight: torch.Tensor, glue: FamilyGlue,
        samples: list[Sample], config: TrainConfig,
        progress: Progress = lambda msg: None, *, world: World | None = None,
        options: RunOptions = RunOptions(), history: list | None = None) -> Metrics:
    """Adam on the drafter's own weights (``embed_tokens`` frozen); returns the metrics of
    the last logging window (``history``, if given, receives every step's (loss, top-1)).
    Every rank of ``world`` calls it with the same arguments."""
    world = world or env_world()
    if config.batch < world.size:
        raise VispecError(f"batch {config.batch} < {world.size} processes. Expected: at least "
                          f"one sequence per process and step. Hint: raise --batch")
    device = world.device
    drafter.to(device).embed_tokens.requires_grad_(False)
    lm_head_weight = lm_head_weight.to(device)
    params = [p for p in drafter.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=config.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 1 - step / config.steps)  # linear decay to 0
    autocast, scaler = _autocast(options.precision, device)
    state = None
    if options.state_dir is not None:
        state = _load_state(Path(options.state_dir), drafter, optimizer, schedule, scaler,
                            config, device)
        if state is not None and world.main:
            progress(f"resuming from step {state.step} ({options.state_dir})")
    state = state or _State.fresh(config.seed)
    rng = np.random.default_rng()
    rng.bit_generator.state = state.rng
    head = None
    if config.vocab:  # the rows of the data's most frequent answer tokens
        counts = count_tokens((s.ids[s.label_from:] for s in samples), len(lm_head_weight))
        ids = torch.from_numpy(choose_draft_vocab(counts, config.vocab)).to(device)
        head = HeadRows(ids, lm_head_weight[ids])
    model = BatchLoss(drafter, lm_head_weight, glue, config.feature_weight, head,
                      config.unroll)
    if world.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True)
    every = max(1, config.steps // 10)
    drafter.train()
    with ProgressBar(f"training {drafter.kind}", config.steps, state.step,
                     enabled=world.main) as bar:
        for step in range(state.step + 1, config.steps + 1):
            batch = rng.choice(len(samples), size=min(config.batch, len(samples)), replace=False)
            mine = [_on(samples[i], device) for i in np.array_split(batch, world.size)[world.rank]]
            with torch.device(device), autocast:
                loss_sum, agree, count = model(mine)
            total_loss, total_agree, total_count = world.sum([float(loss_sum.detach()), agree, count])
            loss = loss_sum * (world.size / total_count)  # DDP averages: mean over all rows
            optimizer.zero_grad()
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            schedule.step()
            state.window.append((total_loss / total_count, int(total_agree), int(total_count)))
            state.history.append((total_loss / total_count, total_agree / total_count))
            metrics = _summary(state.window)
            bar.update(1, f"loss {metrics.loss:.3f} top-1 {metrics.top1:.2f}")
            state.step, state.rng = step, rng.bit_generator.state
            if step % every == 0 or step == config.steps:
                if world.main:
                    progress(f"step {step}/{config.steps} loss {metrics.loss:.3f} "
                             f"top-1 {metrics.top1:.2f}")
                if step != config.steps:
                    state.window = []
            if (options.state_dir is not None and world.main and options.save_every
                    and (step % options.save_every == 0 or step == config.steps)):
                _save_state(Path(options.state_dir), state, drafter, optimizer, schedule,
                            scaler, config)
    drafter.eval()
    if history is not None:
        history[:] = state.history
    return _summary(state.window)


def save_token_counts(folder: str | os.PathLike, samples: list[Sample], vocab_size: int) -> Path:
    """``token_counts.json`` beside a checkpoint: the frequencies of the tokens the drafter
    was trained to predict (what ``export-drafter --draft-vocab`` keeps)."""
    return save_counts(folder, count_tokens((s.ids[s.label_from:] for s in samples), vocab_size))


def train_drafter(target_model_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                  kind: str | None = None, init_dir: str | os.PathLike | None = None,
                  config: TrainConfig = TrainConfig(),
                  data: str | os.PathLike | list[str | os.PathLike] | None = None,
                  options: RunOptions | None = None, overwrite: bool = False,
                  progress: Progress = lambda msg: None) -> Path:
    """Distil a drafter (from ``init_dir`` or a fresh one of ``kind``) from the target at
    ``target_model_dir`` (on the sequences of the ``distill-data`` folder(s) ``data``, else on
    ``config.sequences`` continuations decoded now); writes the official checkpoint layout
    into ``out_dir`` atomically and returns it. Under ``torchrun`` / ``accelerate launch``
    every rank calls it alike; rank 0 writes (with ``train_log.json``: settings and every
    step's loss and top-1). ``options.state_dir`` (default: ``.NAME.train-state`` beside
    ``out_dir``) makes a killed run resumable; it is removed once ``out_dir`` is written."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    options = options or RunOptions()
    options = replace(options, state_dir=options.state_dir or
                      out_dir.parent / f".{out_dir.name}.train-state")
    inputs = [target_model_dir] + ([init_dir] if init_dir is not None else [])
    folders = [] if data is None else list(data) if isinstance(data, (list, tuple)) else [data]
    inputs += folders
    source = ", ".join(map(str, folders)) or None
    with world_group() as world:
        writer = atomic_output_dir(out_dir, overwrite, inputs=inputs) if world.main \
            else nullcontext(None)
        with writer as tmp:  # checks out_dir first
            drafter = initial_drafter(target_model_dir, kind, init_dir, config.seed)
            lm_head = read_text_weight(target_model_dir, "lm_head.weight")  # [V, H]
            glue = glue_for(read_config(target_model_dir))
            if data is not None:
                samples = [s for folder in folders for s in load_samples(folder)]
                if world.main:
                    progress(f"{len(samples)} sequences from {source}")
            else:
                adapter, glue = load_target(target_model_dir)
                samples = decode_samples(adapter, glue, load_processor(target_model_dir),
                                         config, progress)
            history: list = []
            fit(drafter, lm_head, glue, samples, config, progress, world=world, options=options,
                history=history)
            if world.main:
                write_checkpoint(drafter.cpu(), tmp)
                save_token_counts(tmp, samples, drafter.config.vocab_size)
                (tmp / LOG_FILE).write_text(json.dumps(
                    {"config": asdict(config), "processes": world.size,
                     "data": source,
                     "sequences": len(samples), "seconds": round(time.perf_counter() - start),
                     "loss": [h[0] for h in history],
                     "top1": [h[1] for h in history]}))
        world.barrier()
    if world.main and options.state_dir is not None:
        shutil.rmtree(options.state_dir, ignore_errors=True)
        progress(f"trained {drafter.kind} drafter -> {out_dir} in "
                 f"{time.perf_counter() - start:.1f}s")
    return out_dir
