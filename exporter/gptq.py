"""Calibration-aware weight rounding (GPTQ) of a target's language model, in PyTorch, before export.

Round to nearest drops each weight's rounding error; GPTQ (Frantar et al., 2022) rounds the
input columns of a weight one at a time and moves each column's error onto the columns not
yet rounded, weighted by the inverse Hessian ``H = X^T X`` of that layer's calibration
inputs, so the layer's outputs on such inputs move least. Layers are done in order, each
calibrated on the outputs of the layers already rounded. The weights keep float storage, on
the grid the export's round to nearest then stores exactly (``weight_quant``: symmetric, one
scale per block of ``block`` inputs, the block's largest-magnitude value at -2^(bits-1)).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from vispec.runtime.errors import VispecError

DAMP = 0.01  # of the Hessian's mean diagonal, added to it (GPTQ's default)
COLUMNS = 128  # columns rounded between two updates of the rest (lazy batch)


def grid_scale(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Per row of ``w [N, B]``: the scale putting its largest-magnitude value at -2^(bits-1)."""
    top = torch.gather(w, 1, w.abs().argmax(1, keepdim=True))  # [N, 1] signed
    scale = top / -(2 ** (bits - 1))
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def round_to_grid(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.clamp(torch.round(w / scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * scale


@torch.no_grad()
def gptq_weight(weight: torch.Tensor, hessian: torch.Tensor, bits: int, block: int) -> torch.Tensor:
    """``weight [N, K]`` (a Linear's) rounded to ``bits`` in blocks of ``block`` inputs, GPTQ
    with ``hessian [K, K]``; returns float32 values on the grid."""
    w = weight.detach().float().clone()
    k = w.shape[1]
    h = hessian.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += DAMP * torch.mean(torch.diag(h)) * torch.eye(k, dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    scale = extreme = None
    for start in range(0, k, COLUMNS):
        stop = min(start + COLUMNS, k)
        cols, errors = w[:, start:stop].clone(), torch.zeros_like(w[:, start:stop])
        for i in range(stop - start):
            if (start + i) % block == 0:  # the block's scale, from its columns as they are now
                scale = grid_scale(cols[:, i:i + block], bits)  # COLUMNS % block == 0
                extreme = i + cols[:, i:i + block].abs().argmax(1, keepdim=True)  # [N, 1]
            q = round_to_grid(cols[:, i:i + 1], scale, bits)
            # the value that set the scale stays at -2^(bits-1): rounding to nearest then
            # finds the same scale in the stored block
            q = torch.where(extreme == i, -(2 ** (bits - 1)) * scale, q)
            err = (cols[:, i:i + 1] - q) / hinv[start + i, start + i]
            cols[:, i:] -= err @ hinv[start + i:start + i + 1, start + i:stop]
            cols[:, i:i + 1] = q
            errors[:, i:i + 1] = err
        w[:, start:stop] = cols
        w[:, stop:] -= errors @ hinv[start:stop, stop:]
    return w


class _Hessian:
    """Running ``2/n X^T X`` of a Linear's inputs, gathered by a forward hook."""

    def __init__(self, module: torch.nn.Linear):
        self.h = torch.zeros(module.in_features, module.in_features, dtype=torch.float64)
        self.n = 0
        self.hook = module.register_forward_hook(self)

    def __call__(self, module, args, output):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double()  # [tokens, K]
        self.h *= self.n / (self.n + len(x))
        self.n += len(x)
        self.h += 2 / self.n * x.T @ x


class _Stop(Exception):
    """Raised by a hook once the layer being calibrated has run: the rest is not needed."""


def _calibrate(forwards: Sequence[Callable[[], object]], stop_after: torch.nn.Module) -> None:
    def stop(*_):
        raise _Stop
    hook = stop_after.register_forward_hook(stop)
    try:
        for forward in forwards:
            try:
                forward()
            except _Stop:
                pass
    finally:
        hook.remove()


@torch.no_grad()
def gptq_language_model(language_model: torch.nn.Module, lm_head: torch.nn.Linear | None,
                        forwards: Sequence[Callable[[], object]], bits: int, block: int,
                        progress: Callable[[str], None] = lambda msg: None) -> None:
    """Round every Linear of ``language_model.layers`` (and ``lm_head`` unless None) in place.

    ``forwards`` run the model on one calibration prompt each; a layer is calibrated on them
    once the layers before it are rounded. The head is untied from the embedding first (the
    embedding keeps its own float table)."""
    layers = list(language_model.layers)
    for i, layer in enumerate(layers):
        linears = [m for m in layer.modules() if isinstance(m, torch.nn.Linear)]
        stats = [_Hessian(m) for m in linears]
        _calibrate(forwards, layer)
        for m, s in zip(linears, stats):
            s.hook.remove()
            m.weight.data = gptq_weight(m.weight, s.h, bits, block).to(m.weight.dtype)
        progress(f"GPTQ: layer {i + 1}/{len(layers)} rounded to {bits} bits")
    if lm_head is not None:
        lm_head.weight = torch.nn.Parameter(lm_head.weight.detach().clone())  # untie
        stats = _Hessian(lm_head)
        _calibrate(forwards, lm_head)
        stats.hook.remove()
        lm_head.weight.data = gptq_weight(lm_head.weight, stats.h, bits, block).to(lm_head.weight.dtype)
        progress(f"GPTQ: LM head rounded to {bits} bits")


PROMPTS = (  # built-in calibration prompts: each alone and with an image, plus its answer
    "Describe the picture in detail.",
    "What is the capital of France, and why is it famous?",
    "Write a short poem about the sea at night.",
    "List three ways to make a small garden more welcoming to bees.",
    "Explain step by step how a bicycle gear system works.",
    "What colour is the object, and where is it?",
)


def calibration_forwards(adapter, glue, prompts: Sequence, answer_tokens: int = 48
                         ) -> list[Callable[[], object]]:
    """One LM forward per prepared prompt (``runtime.families.Prompt``) over its prompt
    embeddings (image features placed) and the float model's greedy answer to it, as the
    exported LM graph sees them."""
    from .reference import hf_greedy, hf_lm, hf_prompt_embeds

    forwards = []
    for prompt in prompts:
        answer = hf_greedy(adapter, prompt, answer_tokens)
        embeds = torch.cat([hf_prompt_embeds(adapter, glue, prompt),
                            adapter.language_model.embed_tokens(torch.tensor(answer))])
        positions, next_position = glue.position_ids(prompt)
        steps = glue.step_position_ids(next_position, np.arange(len(answer)))
        positions = np.concatenate([positions, steps], axis=-1)
        forwards.append(lambda e=embeds, p=positions: hf_lm(adapter, e, p))
    return forwards


def calibration_prompts(path: str | os.PathLike | None) -> list[tuple[str, list]]:
    """(text, images) to calibrate on: the lines of ``path`` (UTF-8; a line may start with
    image files, relative to the file's folder, each followed by a TAB), else the built-in
    ``PROMPTS``, each alone and with the export's example image."""
    from PIL import Image

    from .export import example_images

    if path is None:
        return [(text, images) for text in PROMPTS for images in ([], example_images()[:1])]
    path = Path(path)
    if not path.is_file():
        raise VispecError(f"calibration file {path} does not exist. Expected UTF-8 text, one "
                          f"prompt per line. Hint: leave out --calibration for the built-in set")
    out = []
    for line in filter(str.strip, path.read_text(encoding="utf-8").splitlines()):
        *files, text = line.split("\t")
        try:
            out.append((text, [Image.open(path.parent / f).convert("RGB") for f in files]))
        except OSError as e:
            raise VispecError(f"calibration file {path}: cannot read image {e.filename}. "
                              f"Expected image paths relative to the file, each followed by a "
                              f"TAB, then the prompt") from e
    if not out:
        raise VispecError(f"calibration file {path} holds no prompt. Expected one per line")
    return out
