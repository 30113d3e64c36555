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
from vispec.runtime.families import FamilyGlue, Prompt
from vispec.runtime.manifest import config_hash
from vispec.runtime.masks import causal_mask, tree_mask
from vispec.runtime.target import TargetModel
from vispec.runtime.weights import weight_graphs

from .export import example_images
from .families import FamilyExport
from .loading import DTYPES, load_target
from .parity import ParityRow, compare, random_tree, relative_error
from .reference import cache_rows, float32_math, hf_lm, hf_prompt_embeds

PROMPT = "Describe the picture in detail."

Outputs = dict[tuple[str, str, str], np.ndarray]  # (graph, case, output) -> values


@dataclass(frozen=True)
class Pair:
    """An exported target and the HF model it came from, both loaded once; ``baseline`` is
    the HF model at the artifact's reduced precision (None for float32 artifacts)."""

    target: TargetModel
    adapter: FamilyExport
    glue: FamilyGlue
    baseline: FamilyExport | None = None


def open_pair(model_dir: str | os.PathLike, artifact_dir: str | os.PathLike,
              backend: str = "ort") -> Pair:
    """Load both sides, after checking that the artifacts come from this model."""
    target = TargetModel(artifact_dir, backend=backend)
    if target.manifest.config_hash != config_hash(model_dir):
        raise ManifestError(f"{artifact_dir} was exported from a different model than "
                            f"{model_dir} (config hash differs). Hint: validate against the "
                            f"model it was exported from, or re-export")
    dtype = target.facts.get("dtype", "float32")
    baseline = load_target(model_dir, dtype)[0] if dtype != "float32" else None
    return Pair(target, *load_target(model_dir), baseline=baseline)


def validate_target(model_dir: str | os.PathLike, artifact_dir: str | os.PathLike, *,
                    seed: int = 0, backend: str = "ort",
                    progress: Callable[[str], None] = lambda msg: None) -> list[ParityRow]:
    """Compare every graph of ``artifact_dir`` with the HF model at ``model_dir`` (float32),
    under the tolerance of the export's precision (for float16: relative to the error of
    the HF model's own float16 forward on the same inputs)."""
    return parity_rows(open_pair(model_dir, artifact_dir, backend), seed, progress)


@dataclass(frozen=True)
class Cases:
    """The parity cases' inputs: a prompt with an image, the decoded token after it, and a
    random tree (tokens, ancestor mask incl. self) hanging off that token."""

    prompt: Prompt
    token: int
    tree_tokens: np.ndarray
    ancestors: np.ndarray

    def names(self) -> tuple[str, str, str]:
        return f"prefill S={len(self.prompt.input_ids)}", "decode S=1", \
            f"tree T={len(self.tree_tokens)}"


def parity_rows(pair: Pair, seed: int = 0,
                progress: Callable[[str], None] = lambda msg: None) -> list[ParityRow]:
    """The parity cases of :func:`validate_target` on an opened pair."""
    facts = pair.target.facts
    precision = facts.get("dtype", "float32")
    cases, got = runtime_outputs(pair.target, np.random.default_rng(seed), progress)
    progress("PyTorch reference")
    want = reference_outputs(pair.adapter, pair.glue, cases)
    baselines: list[Outputs] = []
    if pair.baseline is not None:
        progress(f"PyTorch {precision} forward, and float32 math on its weights")
        baselines.append(reference_outputs(pair.baseline, pair.glue, cases))
        with float32_math(pair.baseline) as exact:
            baselines.append(reference_outputs(exact, pair.glue, cases, DTYPES[precision]))
    return [compare(*key, got[key], want[key], graph_precision(facts, key[0]),
                    *(relative_error(b[key], want[key])[1] for b in baselines))
            for key in want]


def graph_precision(facts: dict, graph: str) -> str:
    """What a graph is held to: its quantized weights (``export --weights``: the LM, and
    the embedding unless excluded), else the export's dtype."""
    return facts["weights"] if graph in weight_graphs(facts) else facts.get("dtype", "float32")


def _lm_outputs(case: str, logits, hidden, kv) -> Outputs:
    """The LM step's outputs of one case (torch tensors or arrays) as arrays."""
    logits, hidden = (t.float().numpy() if isinstance(t, torch.Tensor) else t
                      for t in (logits, hidden))
    return {("lm", case, "logits"): logits, ("lm", case, "hidden_states"): hidden,
            ("lm", case, "present_kv"): kv}


def _prompt_outputs(embeds: np.ndarray, text: np.ndarray) -> Outputs:
    return {("embed", "prompt", "inputs_embeds"): embeds[text],
            ("vision", "1 image", "image_features"): embeds[~text]}


def runtime_outputs(target: TargetModel, rng: np.random.Generator,
                    progress: Callable[[str], None] = lambda msg: None) -> tuple[Cases, Outputs]:
    """Run every case through the exported graphs; the decoded token is the runtime's
    argmax after the prompt, the tree is drawn from ``rng`` (8-32 nodes)."""
    glue = target.glue
    prompt = target.prepare(PROMPT, example_images()[:1])
    progress("embed + vision graphs")
    embeds = target.prompt_embeds(prompt)
    got = _prompt_outputs(embeds, prompt.input_ids != glue.image_token_id)
    progress("lm graph: prefill, decode")
    cache = target.new_cache()
    positions, next_pos = glue.position_ids(prompt)
    n = len(embeds)
    out = target.step(cache, embeds, positions, causal_mask(0, n))
    cache.commit(n)
    token = int(np.argmax(out.logits[-1]))
    size = int(rng.integers(8, 33))
    _, ancestors = random_tree(rng, size)
    cases = Cases(prompt, token, rng.integers(0, target.facts["vocab_size"], size), ancestors)
    prefill, decode, tree = cases.names()
    got.update(_lm_outputs(prefill, out.logits, out.hidden, _kv(cache, 0, n)))
    step_pos = glue.step_position_ids(next_pos, np.zeros(1, np.int64))
    out = target.step(cache, target.embed([token]), step_pos, causal_mask(n, 1))
    cache.commit(1)
    got.update(_lm_outputs(decode, out.logits, out.hidden, _kv(cache, n, n + 1)))
    progress(f"lm graph: tree of {size} nodes")
    depths = ancestors.sum(1) - 1
    out = target.step(cache, target.embed(cases.tree_tokens),
                      glue.step_position_ids(next_pos + 1, depths), tree_mask(n + 1, ancestors))
    got.update(_lm_outputs(tree, out.logits, out.hidden, _kv(cache, n + 1, n + 1 + size)))
    return cases, got


@torch.no_grad()
def reference_outputs(adapter: FamilyExport, glue: FamilyGlue, cases: Cases,
                      io_dtype: torch.dtype | None = None) -> Outputs:
    """The same cases through the HF model in PyTorch (at the adapter's precision).

    ``io_dtype``: the prompt embeddings going in and every output coming out are rounded
    through it, as a graph with that IO precision must round them."""
    prefill, decode, tree = cases.names()
    embeds = hf_prompt_embeds(adapter, glue, cases.prompt)
    if io_dtype is not None:
        embeds = embeds.to(io_dtype).to(embeds.dtype)
    want = _prompt_outputs(embeds.float().numpy(), cases.prompt.input_ids != glue.image_token_id)
    positions, next_pos = glue.position_ids(cases.prompt)
    n = len(embeds)
    logits, hidden, cache = hf_lm(adapter, embeds, positions)
    want.update(_lm_outputs(prefill, logits, hidden, _stack(cache_rows(cache, 0, n))))
    e = adapter.language_model.embed_tokens(torch.tensor([cases.token]))
    step_pos = glue.step_position_ids(next_pos, np.zeros(1, np.int64))
    logits, hidden, cache = hf_lm(adapter, e, step_pos, cache)
    want.update(_lm_outputs(decode, logits, hidden, _stack(cache_rows(cache, n, n + 1))))
    want.update(_lm_outputs(tree, *_tree_reference(
        adapter, torch.cat([embeds, e]), np.concatenate([positions, step_pos], axis=-1), glue,
        next_pos + 1, cases.tree_tokens, cases.ancestors)))
    if io_dtype is not None:
        np_dtype = torch.empty(0, dtype=io_dtype).numpy().dtype
        want = {key: np.asarray(v).astype(np_dtype).astype(np.float32) for key, v in want.items()}
    return want


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
    b = cache.to_host()[:, :, start:stop]
    return b.reshape(-1, *b.shape[2:])


def _stack(rows: list[torch.Tensor]) -> np.ndarray:
    return torch.cat(rows).numpy()
