"""Parity of exported target graphs against the HF model in PyTorch.

Cases: the embedding and vision graphs on a real prompt with an image; the LM step at
prefill, at a one-token decode, and over a random tree of 8-32 nodes with a non-causal
mask over a real past. The tree reference is independent of any mask support in HF:
node j's outputs must equal a plain causal forward over ``prefix + path(root..j)``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from vispec.runtime.errors import ManifestError
from vispec.runtime.families import FamilyGlue
from vispec.runtime.manifest import config_hash
from vispec.runtime.masks import causal_mask, tree_mask
from vispec.runtime.target import TargetModel

from .export import example_images
from .families import FamilyExport
from .loading import load_target
from .parity import ParityRow, compare, random_tree
from .reference import cache_rows, hf_lm, hf_prompt_embeds

PROMPT = "Describe the picture in detail."


def _compare_step(rows: list, case: str, out, want_logits, want_hidden, kv, want_kv,
                  precision: str) -> None:
    rows.append(compare("lm", case, "logits", out.logits, want_logits, precision))
    rows.append(compare("lm", case, "hidden_states", out.hidden, want_hidden, precision))
    rows.append(compare("lm", case, "present_kv", kv, want_kv, precision))


@dataclass(frozen=True)
class Pair:
    """An exported target and the HF model it came from, both loaded once."""

    target: TargetModel
    adapter: FamilyExport
    glue: FamilyGlue


def open_pair(model_dir: str | os.PathLike, artifact_dir: str | os.PathLike,
              backend: str = "ort") -> Pair:
    """Load both sides, after checking that the artifacts come from this model."""
    target = TargetModel(artifact_dir, backend=backend)
    if target.manifest.config_hash != config_hash(model_dir):
        raise ManifestError(f"{artifact_dir} was exported from a different model than "
                            f"{model_dir} (config hash differs). Hint: validate against the "
                            f"model it was exported from, or re-export")
    return Pair(target, *load_target(model_dir))


def validate_target(model_dir: str | os.PathLike, artifact_dir: str | os.PathLike, *,
                    seed: int = 0, backend: str = "ort",
                    progress: Callable[[str], None] = lambda msg: None) -> list[ParityRow]:
    """Compare every graph of ``artifact_dir`` with the HF model at ``model_dir`` (float32),
    under the tolerance of the export's precision."""
    return parity_rows(open_pair(model_dir, artifact_dir, backend), seed, progress)


def parity_rows(pair: Pair, seed: int = 0,
                progress: Callable[[str], None] = lambda msg: None) -> list[ParityRow]:
    """The parity cases of :func:`validate_target` on an opened pair."""
    target, adapter, glue = pair.target, pair.adapter, pair.glue
    precision = target.facts.get("dtype", "float32")
    rng = np.random.default_rng(seed)
    prompt = target.prepare(PROMPT, example_images()[:1])
    rows: list[ParityRow] = []

    progress("embed + vision graphs")
    embeds = target.prompt_embeds(prompt)
    want_embeds = hf_prompt_embeds(adapter, glue, prompt)
    text = prompt.input_ids != glue.image_token_id
    rows.append(compare("embed", "prompt", "inputs_embeds", embeds[text],
                        want_embeds[torch.from_numpy(text)].numpy(), precision))
    rows.append(compare("vision", "1 image", "image_features", embeds[~text],
                        want_embeds[torch.from_numpy(~text)].numpy(), precision))

    progress("lm graph: prefill")
    cache = target.new_cache()
    positions, next_pos = glue.position_ids(prompt)
    n = len(embeds)
    out = target.step(cache, embeds, positions, causal_mask(0, n))
    cache.commit(n)
    logits, hidden, hf_cache = hf_lm(adapter, want_embeds, positions)
    _compare_step(rows, f"prefill S={n}", out, logits, hidden, _kv(cache, 0, n),
                  _stack(cache_rows(hf_cache, 0, n)), precision)

    progress("lm graph: decode")
    token = int(np.argmax(out.logits[-1]))
    e = target.embed([token]).astype(np.float32)
    step_pos = glue.step_position_ids(next_pos, np.zeros(1, np.int64))
    out = target.step(cache, e, step_pos, causal_mask(n, 1))
    cache.commit(1)
    logits, hidden, hf_cache = hf_lm(adapter, torch.from_numpy(e), step_pos, hf_cache)
    _compare_step(rows, "decode S=1", out, logits, hidden, _kv(cache, n, n + 1),
                  _stack(cache_rows(hf_cache, n, n + 1)), precision)

    size = int(rng.integers(8, 33))
    progress(f"lm graph: tree of {size} nodes")
    parents, ancestors = random_tree(rng, size)
    depths = ancestors.sum(1) - 1
    tokens = rng.integers(0, target.facts["vocab_size"], size)
    past, next_pos = cache.length, next_pos + 1
    out = target.step(cache, target.embed(tokens), glue.step_position_ids(next_pos, depths),
                      tree_mask(past, ancestors))
    want = _tree_reference(adapter, torch.cat([want_embeds, torch.from_numpy(e)]),
                           np.concatenate([positions, step_pos], axis=-1), glue, next_pos,
                           tokens, ancestors)
    _compare_step(rows, f"tree T={size}", out, want[0], want[1], _kv(cache, past, past + size),
                  want[2], precision)
    return rows


@torch.no_grad()
def _tree_reference(adapter, prefix_embeds, prefix_pos, glue, next_pos, tokens, ancestors):
    """Per node: a causal HF forward over prefix + the node's root-to-node path."""
    logits, hidden, kv = [], [], []
    n = len(prefix_embeds)
    for j in range(len(tokens)):
        path = np.flatnonzero(ancestors[j])  # ancestors in index order = root..j
        ids = torch.from_numpy(tokens[path])
        embeds = torch.cat([prefix_embeds, adapter.language_model.embed_tokens(ids)])
        pos = np.concatenate([prefix_pos, glue.step_position_ids(next_pos, np.arange(len(path)))],
                             axis=-1)
        lg, hd, cache = hf_lm(adapter, embeds, pos)
        last = n + len(path) - 1
        logits.append(lg[-1])
        hidden.append(hd[-1])
        kv.append(_stack(cache_rows(cache, last, last + 1)))
    return torch.stack(logits), torch.stack(hidden), np.concatenate(kv, axis=1)


def _kv(cache, start: int, stop: int) -> np.ndarray:
    """``[2*layers, n, kvh, hd]`` rows of the runtime cache."""
    b = cache.buffer[:, :, start:stop]
    return b.reshape(-1, *b.shape[2:])


def _stack(rows: list[torch.Tensor]) -> np.ndarray:
    return torch.cat(rows).numpy()
