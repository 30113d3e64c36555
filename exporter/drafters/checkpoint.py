"""Read and write drafter checkpoints in the official layout (config.json + one weight file).

Loading checks cheap things first (config fields, hidden and vocab size against the target),
then reads the weight file's keys and shapes, detects the kind (``imadpt.*`` -> ViSpec,
``residual`` -> HiViS, else EAGLE) and loads strictly.
"""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from vispec.runtime.errors import ModelDirError
from vispec.runtime.families import glue_for
from vispec.runtime.model_dir import read_config

from ..loading import read_text_weight
from .config import DrafterConfig
from .modules import Drafter, build_drafter

WEIGHT_FILES = ("pytorch_model.bin", "model.safetensors")  # tried in this order
_REQUIRED_FIELDS = ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")


class DrafterCheckpointError(ModelDirError):
    """A drafter folder is incomplete, inconsistent, or does not fit the target."""


def weight_file(drafter_dir: str | os.PathLike) -> Path:
    """The folder's weight file: ``pytorch_model.bin`` if present, else ``model.safetensors``."""
    for name in WEIGHT_FILES:
        if (Path(drafter_dir) / name).is_file():
            return Path(drafter_dir) / name
    raise DrafterCheckpointError(f"{drafter_dir} has no drafter weights "
                                 f"({' or '.join(WEIGHT_FILES)}). Hint: download the whole "
                                 f"drafter folder")


def check_against_target(config: dict, target_model_dir: str | os.PathLike) -> None:
    """Cheap check before any weight is read: the drafter was trained for this target."""
    target = glue_for(read_config(target_model_dir)).text_config
    problems = [f"{field} {config[field]} vs the target's {target[field]}"
                for field in ("hidden_size", "vocab_size")
                if int(config[field]) != int(target[field])]
    if problems:
        raise DrafterCheckpointError(f"the drafter does not match the target model at "
                                     f"{target_model_dir}: {'; '.join(problems)}. Hint: use the "
                                     f"drafter released for this exact target model")


def read_drafter_config(drafter_dir: str | os.PathLike) -> dict:
    """``config.json`` with the fields every drafter needs."""
    config = read_config(drafter_dir)
    missing = [f for f in _REQUIRED_FIELDS if f not in config]
    if missing:
        raise DrafterCheckpointError(f"{drafter_dir}/config.json lacks {missing}. Hint: use the "
                                     f"config.json released with the drafter")
    return config


def detect_kind(keys) -> str:
    """``imadpt.*`` -> vispec, ``residual`` -> hivis, otherwise eagle."""
    keys = set(keys)
    if any(k.startswith("imadpt.") for k in keys):
        return "vispec"
    return "hivis" if "residual" in keys else "eagle"


def read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a weight file, without reading tensors of safetensors files; a clear
    error for a truncated or corrupt file."""
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        return {k: tuple(v.shape) for k, v in _load_bin(path).items()}
    except (OSError, EOFError, RuntimeError, pickle.UnpicklingError, SafetensorError) as e:
        raise DrafterCheckpointError(f"{path} is truncated or corrupt ({e}). Hint: copy or "
                                     f"download the drafter checkpoint again") from e


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)


def drafter_config(drafter_dir: str | os.PathLike,
                   target_model_dir: str | os.PathLike | None = None) -> DrafterConfig:
    """The drafter's architecture: config.json, the kind from the keys, and the two sizes
    not in config.json (``num_q`` from ``imadpt.q``, residual rows from ``residual``)."""
    config = read_drafter_config(drafter_dir)
    if target_model_dir is not None:
        check_against_target(config, target_model_dir)
    shapes = read_shapes(weight_file(drafter_dir))
    kind = detect_kind(shapes)
    num_q = shapes.get("imadpt.q", (0,))[0]
    rows = shapes.get("residual", (0,))[0]
    return DrafterConfig.from_json(config, kind, num_q=num_q, residual_rows=rows)


def load_drafter(drafter_dir: str | os.PathLike,
                 target_model_dir: str | os.PathLike | None = None) -> Drafter:
    """Load a drafter folder strictly (float32, eval); checks against the target first."""
    config = drafter_config(drafter_dir, target_model_dir)
    path = weight_file(drafter_dir)
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
    else:
        state = _load_bin(path)
    # Older transformers saved the rotary tables; they are recomputed, never learned.
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    if "embed_tokens.weight" not in state and target_model_dir is not None:
        # the drafter's embeddings are the target's (the official code copies them too)
        state["embed_tokens.weight"] = read_text_weight(target_model_dir, "embed_tokens.weight")
    drafter = build_drafter(config)
    _check_state(drafter, state, path, config.kind)
    drafter.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return drafter.float().eval()


def _check_state(drafter: Drafter, state: dict, path: Path, kind: str) -> None:
    """Every key present with the right shape, none extra; all problems in one error."""
    want = {k: tuple(v.shape) for k, v in drafter.state_dict().items()}
    missing = sorted(set(want) - set(state))
    extra = sorted(set(state) - set(want))
    wrong = [f"{k} {tuple(state[k].shape)} (expected {want[k]})"
             for k in sorted(set(want) & set(state)) if tuple(state[k].shape) != want[k]]
    problems = ([f"missing keys {missing}"] if missing else []) + \
        ([f"unexpected keys {extra}"] if extra else []) + \
        ([f"wrong shapes: {', '.join(wrong)}"] if wrong else [])
    if problems:
        raise DrafterCheckpointError(
            f"{path} is not a valid {kind} drafter for its config.json: {'; '.join(problems)}. "
            f"Hint: keys must follow the official layout (layers.0.*, fc.*, embed_tokens.weight, "
            f"plus imadpt.*/img_fc.* for ViSpec or residual for HiViS); check that config.json "
            f"(qkv_bias, bias, sizes) belongs to these weights")


def write_checkpoint(drafter: Drafter, out_dir: str | os.PathLike,
                     fmt: str = "safetensors") -> Path:
    """Write ``drafter`` as an official folder: config.json + model.safetensors or
    pytorch_model.bin (``fmt`` = "safetensors" | "bin")."""
    if fmt not in ("safetensors", "bin"):
        raise ValueError(f"fmt {fmt!r}: expected 'safetensors' or 'bin'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(drafter.config.to_json(), indent=1))
    state = {k: v.detach().contiguous() for k, v in drafter.state_dict().items()}
    if fmt == "safetensors":
        save_file(state, str(out / "model.safetensors"))
    else:
        torch.save(state, str(out / "pytorch_model.bin"))
    return out


@torch.no_grad()
def new_drafter(kind: str, target_model_dir: str | os.PathLike, seed: int = 0) -> Drafter:
    """A fresh drafter of ``kind`` sized from the target's text config, with the modules'
    own init (ViSpec's img_fc passes f through, HiViS's residual is zero) and the target's
    ``embed_tokens``."""
    text = glue_for(read_config(target_model_dir)).text_config
    config = DrafterConfig.from_json(
        {**text, "rope_theta": text.get("rope_parameters", {}).get("rope_theta"),
         "rope_scaling": None, "qkv_bias": kind == "hivis", "bias": True},  # both qkv layouts
        kind, num_q=3 if kind == "vispec" else 0, residual_rows=4 if kind == "hivis" else 0)
    torch.manual_seed(seed)
    drafter = build_drafter(config)
    drafter.embed_tokens.weight.copy_(read_text_weight(target_model_dir, "embed_tokens.weight"))
    return drafter

