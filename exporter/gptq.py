"""Calibration-aware weight rounding (GPTQ) of a target's language model, in PyTorch, before export.

Round to nearest drops each weight's rounding error; GPTQ (Frantar et al., 2022) rounds the
input columns of a weight one at a time and moves each column's error onto the columns not
yet rounded, weighted by the inverse Hessian ``H = X^T X`` of that layer's calibration
inputs, so the layer's outputs on such inputs move least. Columns go in the order of
``H``'s diagonal, largest first ("act order"), each on its block's grid fixed from the
weights before rounding ("static groups"), so the blocks stay contiguous along the inputs.
Layers are done in order, each calibrated on the outputs of the layers already rounded.
The weights keep float storage, on the grid the export then stores exactly
(``weight_quant``), one per block of ``block`` inputs:

- ``zero_points`` (int4): min/max with an integer zero point over the block's range widened
  to hold 0, ``d (q - z)`` with ``q`` in 0..2^bits - 1 (``pack_minmax`` with no float part);
  the block's smallest (largest) value held at the grid's lowest (highest) level when it
  is <= 0 (>= 0), which fixes the same ``d`` and ``z`` in the stored block;
- else symmetric: the block's largest-magnitude value held at -2^(bits-1), which fixes the
  scale ONNX Runtime's quantizer finds.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch

from vispec.runtime.errors import VispecError

DAMP = 0.01  # of the Hessian's mean diagonal, added to it (GPTQ's default)
COLUMNS = 128  # columns rounded between two updates of the rest (lazy batch)


class Grid(NamedTuple):
    """Per row and block of a weight ``[N, K]``: ``scale``, ``zero`` (levels ``(q - zero) *
    scale``, ``q`` in 0..``top``), and the columns held at the lowest / highest level
    (``-1``: none)."""
    scale: torch.Tensor  # [N, K / block]
    zero: torch.Tensor  # [N, K / block]
    top: int
    low: torch.Tensor  # [N, K / block] column index or -1
    high: torch.Tensor  # [N, K / block] column index or -1


def block_grid(w: torch.Tensor, bits: int, block: int, zero_points: bool) -> Grid:
    """The grid of each block of ``block`` inputs of ``w [N, K]`` (module docstring); a last
    partial block padded with its last column, as ``weight_quant`` stores it."""
    n, k = w.shape
    blocks = torch.cat([w, w[:, -1:].expand(n, -k % block)], 1).reshape(n, -1, block)
    first = torch.arange(0, k, block)
    top = 2 ** bits - 1
    none = torch.full(blocks.shape[:2], -1)
    zeros = blocks.abs().amax(2) == 0  # all-zero blocks: scale 1, nothing held
    if zero_points:
        lo, hi = blocks.min(2).values.clamp(max=0), blocks.max(2).values.clamp(min=0)
        scale = torch.where(zeros, 1.0, (hi - lo) / top)
        zero = torch.clamp(torch.round(-lo / scale), 0, top)
        low = torch.where((blocks.min(2).values <= 0) & ~zeros, blocks.argmin(2) + first, none)
        high = torch.where((blocks.max(2).values >= 0) & ~zeros, blocks.argmax(2) + first, none)
        return Grid(scale, zero, top, low, high)
    extreme = blocks.abs().argmax(2, keepdim=True)
    scale = torch.gather(blocks, 2, extreme).squeeze(2) / -(2 ** (bits - 1))  # signed
    scale = torch.where(zeros, 1.0, scale)
    held = torch.where(zeros, none, extreme.squeeze(2) + first)
    return Grid(scale, torch.full_like(scale, 2 ** (bits - 1)), top, held, none)


def round_column(column: torch.Tensor, index: int, grid: Grid, block: int) -> torch.Tensor:
    """Input column ``index`` (``[N, 1]``) on its block's grid, held columns at their level."""
    g = index // block
    scale, zero = grid.scale[:, g:g + 1], grid.zero[:, g:g + 1]
    q = torch.clamp(torch.round(column / scale + zero), 0, grid.top)
    q = torch.where(grid.low[:, g:g + 1] == index, torch.zeros_like(q), q)
    q = torch.where(grid.high[:, g:g + 1] == index, torch.full_like(q, grid.top), q)
    return (q - zero) * scale


@torch.no_grad()
def gptq_weight(weight: torch.Tensor, hessian: torch.Tensor, bits: int, block: int,
                zero_points: bool = False) -> torch.Tensor:
    """``weight [N, K]`` (a Linear's) rounded to ``bits`` in blocks of ``block`` inputs, GPTQ
    with ``hessian [K, K]`` in act order; returns float32 values on the grid."""
    w = weight.detach().float().clone()
    k = w.shape[1]
    h = hessian.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    grid = block_grid(w, bits, block, zero_points)
    order = torch.argsort(torch.diag(h), descending=True)
    w, h = w[:, order], h[order][:, order]
    h += DAMP * torch.mean(torch.diag(h)) * torch.eye(k, dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    for start in range(0, k, COLUMNS):
        stop = min(start + COLUMNS, k)
        cols, errors = w[:, start:stop].clone(), torch.zeros_like(w[:, start:stop])
        for i in range(stop - start):
            q = round_column(cols[:, i:i + 1], int(order[start + i]), grid, block)
            err = (cols[:, i:i + 1] - q) / hinv[start + i, start + i]
            cols[:, i:] -= err @ hinv[start + i:start + i + 1, start + i:stop]
            cols[:, i:i + 1] = q
            errors[:, i:i + 1] = err
        w[:, start:stop] = cols
        w[:, stop:] -= errors @ hinv[start:stop, stop:]
    out = torch.empty_like(w)
    out[:, order] = w
    return out


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
    """Raised by a hook once what is wanted of a calibration forward is caught."""


def _run(forwards: Sequence[Callable[[], object]]) -> None:
    """Each forward, until a hook stops it (``_Stop``)."""
    for forward in forwards:
        try:
            forward()
        except _Stop:
            pass


def _calibrate(forwards: Sequence[Callable[[], object]], stop_after: torch.nn.Module) -> None:
    def stop(*_):
        raise _Stop
    hook = stop_after.register_forward_hook(stop)
    try:
        _run(forwards)
    finally:
        hook.remove()


def _layer_inputs(forwards: Sequence[Callable[[], object]], layer: torch.nn.Module
                  ) -> list[tuple[tuple, dict]]:
    """Each forward's ``(args, kwargs)`` into ``layer`` (the first decoder layer), caught
    before it runs, with the KV cache taken out (a layer then runs alone, again and again)."""
    caught = []

    def catch(module, args, kwargs):
        kwargs = dict(kwargs)
        for name in ("past_key_values", "past_key_value"):
            if name in kwargs:
                kwargs[name] = None
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        caught.append((args, kwargs))
        raise _Stop
    hook = layer.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        _run(forwards)
    finally:
        hook.remove()
    return caught


def _run_layer(layer: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``layer`` over its inputs; returns the next layer's inputs (its hidden states in
    place of these)."""
    out = layer(*args, **kwargs)
    hidden = out[0] if isinstance(out, tuple) else out
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


@torch.no_grad()
def gptq_language_model(language_model: torch.nn.Module, lm_head: torch.nn.Linear | None,
                        forwards: Sequence[Callable[[], object]], bits: int, block: int,
                        zero_points: bool = False,
                        progress: Callable[[str], None] = lambda msg: None) -> None:
    """Round every Linear of ``language_model.layers`` (and ``lm_head`` unless None) in place,
    on the ``zero_points`` or symmetric grid (module docstring).

    ``forwards`` run the model on one calibration prompt each; the first layer's inputs are
    caught once, then each layer is calibrated on its inputs and, once rounded, makes the
    next one's. The head is calibrated on full forwards, untied from the embedding first
    (the embedding keeps its own float table)."""
    layers = list(language_model.layers)
    inputs = _layer_inputs(forwards, layers[0])
    for i, layer in enumerate(layers):
        linears = [m for m in layer.modules() if isinstance(m, torch.nn.Linear)]
        stats = [_Hessian(m) for m in linears]
        for args, kwargs in inputs:
            layer(*args, **kwargs)
        for m, s in zip(linears, stats):
            s.hook.remove()
            m.weight.data = gptq_weight(m.weight, s.h, bits, block, zero_points).to(m.weight.dtype)
        inputs = [_run_layer(layer, args, kwargs) for args, kwargs in inputs]
        progress(f"GPTQ: layer {i + 1}/{len(layers)} rounded to {bits} bits")
    if lm_head is not None:
        lm_head.weight = torch.nn.Parameter(lm_head.weight.detach().clone())  # untie
        stats = _Hessian(lm_head)
        _calibrate(forwards, lm_head)
        stats.hook.remove()
        lm_head.weight.data = gptq_weight(lm_head.weight, stats.h, bits, block,
                                           zero_points).to(lm_head.weight.dtype)
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
