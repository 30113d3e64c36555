"""PyTorch references: the HF model's own image features, LM forward and greedy decoding."""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from itertools import chain
from typing import Iterator

import numpy as np
import torch
from transformers import DynamicCache

from vispec.runtime.families import FamilyGlue, Prompt

from .families import FamilyExport


def torch_inputs(prompt: Prompt) -> dict[str, torch.Tensor]:
    """The processor's outputs for a prompt as the HF model takes them (batch of one)."""
    inputs = {"input_ids": torch.from_numpy(prompt.input_ids)[None],
              "attention_mask": torch.ones(1, len(prompt.input_ids), dtype=torch.long)}
    inputs.update({k: torch.from_numpy(np.asarray(v)) for k, v in prompt.processed.items()})
    return inputs


@torch.no_grad()
def hf_prompt_embeds(adapter: FamilyExport, glue: FamilyGlue, prompt: Prompt) -> torch.Tensor:
    """``[L, H]`` on the model's device: token embeddings with HF ``get_image_features``
    placed at image slots."""
    device = adapter.model.device
    ids = torch.from_numpy(prompt.input_ids).to(device)
    embeds = adapter.language_model.embed_tokens(ids).clone()
    if prompt.has_images:
        inputs = torch_inputs(prompt)
        kwargs = {k: v.to(device) for k, v in inputs.items()
                  if k in ("pixel_values", "image_sizes", "image_grid_thw")}
        out = adapter.model.model.get_image_features(**kwargs)
        feats = out.pooler_output if hasattr(out, "pooler_output") else out
        feats = torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats
        embeds[ids == glue.image_token_id] = feats.reshape(-1, embeds.shape[-1]).to(embeds)
    return embeds


@torch.no_grad()
def hf_lm(adapter: FamilyExport, embeds: torch.Tensor, position_ids: np.ndarray,
          cache: DynamicCache | None = None):
    """HF language model + LM head over ``embeds [S, H]`` (causal, after ``cache``).

    Returns ``(logits [S, V], hidden [S, H], cache)``; the cache then holds the new K/V.
    """
    cache = cache if cache is not None else DynamicCache(config=adapter.model.config)
    with warnings.catch_warnings():  # newer transformers call it `cache`; >= 5.0 takes this
        warnings.filterwarnings("ignore", "`past_key_values` is deprecated", FutureWarning)
        out = adapter.language_model(inputs_embeds=embeds[None],
                                     position_ids=torch.from_numpy(position_ids).to(embeds.device),
                                     past_key_values=cache, use_cache=True)
    hidden = out.last_hidden_state
    return adapter.lm_head(hidden)[0], hidden[0], cache


def cache_rows(cache: DynamicCache, start: int, stop: int) -> list[torch.Tensor]:
    """Flat ``[k0, v0, k1, ...]`` rows ``[start, stop)`` of an HF cache, as ``[1, n, kvh, hd]``."""
    rows = []
    for layer in cache.layers:
        rows += [layer.keys[:, :, start:stop].transpose(1, 2),
                 layer.values[:, :, start:stop].transpose(1, 2)]
    return rows


@torch.no_grad()
def hf_greedy(adapter: FamilyExport, prompt: Prompt, max_new_tokens: int) -> list[int]:
    """Tokens of ``model.generate(do_sample=False)`` on the same processed prompt."""
    inputs = torch_inputs(prompt)
    out = adapter.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


@contextmanager
def float32_math(adapter: FamilyExport) -> Iterator[FamilyExport]:
    """The adapter's model computing in float32 on its own (e.g. float16-rounded) weights,
    for the duration; every parameter and buffer gets its dtype back afterwards (a lossless
    round trip). What exact arithmetic on reduced-precision weights gives: the error no
    graph at that precision can go below."""
    tensors = list(chain(adapter.model.parameters(), adapter.model.buffers()))
    dtypes = [t.dtype for t in tensors]
    for t in tensors:
        if t.is_floating_point():
            t.data = t.data.float()
    try:
        yield adapter
    finally:
        for t, dtype in zip(tensors, dtypes):
            t.data = t.data.to(dtype)
