"""Export a drafter to ONNX (its draft graph and ViSpec's adaptor) with a manifest, and check
the graphs under ONNX Runtime against the PyTorch modules."""
from __future__ import annotations

import functools
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from vispec.runtime.backends import make_runner
from vispec.runtime.drafter_specs import (
    DRAFT,
    EMBEDDED,
    FUSED_ROW,
    GLOBAL_FEATURE,
    IMAGE_EMBEDS,
    IMAGE_TOKENS,
    RESIDUAL_INDEX,
    adaptor_spec,
    draft_spec,
)
from vispec.runtime.errors import VispecError
from vispec.runtime.families import glue_for
from vispec.runtime.manifest import Manifest, config_hash
from vispec.runtime.model_dir import read_config
from vispec.runtime.specs import (
    ATTENTION_MASK,
    INPUT_IDS,
    LOGIT_ROWS,
    NEW,
    PAST,
    TOPK_IDS,
    TOPK_LOGPROBS,
    GraphSpec,
    past_names,
    present_names,
)
from vispec.runtime.weights import BITS, FLOAT, WEIGHTS, require_weights_runtime

from ..artifacts import ArtifactInfo, GraphJob, write_artifact
from ..export import DEFAULT_OPSET, EXAMPLE_NEW, EXAMPLE_PAST, check_opset
from ..loading import read_text_weight
from ..onnx_io import example_feeds
from ..parity import ParityRow, compare, random_tree, tolerance
from ..weight_quant import quantize_matmuls
from .checkpoint import load_drafter
from .draft_vocab import DRAFT_VOCAB_FILE, select_draft_vocab
from .modules import AdaptorGraph, Drafter, DraftGraph

DEFAULT_MAX_IMAGE_TOKENS = 4096
EXAMPLE_IMAGE_TOKENS = 8


def target_lm_head(target_model_dir: str | os.PathLike) -> torch.Tensor:
    """The target's LM head weight ``[V, H]`` (float32), used for the drafter's logits."""
    return read_text_weight(target_model_dir, "lm_head.weight")


def drafter_graphs(drafter: Drafter, lm_head_weight: torch.Tensor, *, top_k: int,
                   max_len: int, max_image_tokens: int,
                   draft_ids: np.ndarray | None = None) -> dict[str, tuple]:
    """Graph name -> (module, spec) for ``drafter`` (its head cut to ``draft_ids`` if given).
    The draft graph embeds tokens with the drafter's own table (the target's when the
    checkpoint has none: ``load_drafter`` fills it in)."""
    c = drafter.config
    graphs = {DRAFT: (DraftGraph(drafter, lm_head_weight, top_k,
                                 None if draft_ids is None else torch.from_numpy(draft_ids)),
                      draft_spec(c.kind, hidden_size=c.hidden_size, kv_heads=c.kv_heads,
                                 head_dim=c.head_dim, top_k=top_k, max_len=max_len))}
    if c.kind == "vispec":
        graphs["adaptor"] = (AdaptorGraph(drafter),
                             adaptor_spec(hidden_size=c.hidden_size, num_q=c.num_q,
                                          max_image_tokens=max_image_tokens))
    return graphs


def fixed_inputs(spec: GraphSpec, drafter: Drafter, rng: np.random.Generator,
                 new: int) -> dict[str, np.ndarray]:
    """The inputs ``example_feeds`` does not make up, where ``spec`` takes them: HiViS's
    residual row of tree level 1; ``new`` row ids mixing token ids, ``EMBEDDED`` and
    ``FUSED_ROW`` rows (every kind of row is traced and checked); ViSpec's global feature
    per row (0, then one image's, as over a prompt's rows); the rows to score, some
    of them out of order (3 of 4 or more, else all: the tracer bakes in sizes of 1 and 2)."""
    feeds = {}
    if GLOBAL_FEATURE in spec.input_names:  # as a prompt's rows see it: 0 before the image
        g = np.zeros((1, new, drafter.config.hidden_size), np.float32)
        g[:, new // 2:] = rng.standard_normal(drafter.config.hidden_size)
        feeds[GLOBAL_FEATURE] = g
    if LOGIT_ROWS in spec.input_names:
        rows = rng.permutation(new)[:3] if new >= 4 else np.arange(new)
        feeds[LOGIT_ROWS] = rows.astype(np.int64)
    if RESIDUAL_INDEX in spec.input_names:
        feeds[RESIDUAL_INDEX] = np.array([min(1, drafter.config.residual_rows - 1)], np.int64)
    if INPUT_IDS in spec.input_names:
        ids = rng.integers(0, drafter.config.vocab_size, (1, new), dtype=np.int64)
        kinds = rng.integers(0, 3, (1, new))
        ids[kinds == 1], ids[kinds == 2] = EMBEDDED, FUSED_ROW
        feeds[INPUT_IDS] = ids
    return feeds


def drafter_manifest_facts(drafter: Drafter, top_k: int, target_model_dir: Path,
                           draft_vocab: int | None = None, weights: str = "float32") -> dict:
    """The manifest's model facts: the drafter's architecture and export settings the
    runtime needs, plus the target it belongs to (family, config hash)."""
    c = drafter.config
    return {"drafter_type": c.kind, "hidden_size": c.hidden_size, "vocab_size": c.vocab_size,
            "draft_vocab": draft_vocab, "weights": weights,
            "num_heads": c.num_heads, "kv_heads": c.kv_heads, "head_dim": c.head_dim,
            "top_k": top_k, "num_q": c.num_q, "residual_rows": c.residual_rows,
            "target_model_type": glue_for(read_config(target_model_dir)).model_type,
            "target_config_hash": config_hash(target_model_dir)}


def export_drafter(drafter_dir: str | os.PathLike, target_model_dir: str | os.PathLike,
                   out_dir: str | os.PathLike, *, top_k: int = 10, max_len: int = 1024,
                   max_image_tokens: int = DEFAULT_MAX_IMAGE_TOKENS, opset: int = DEFAULT_OPSET,
                   draft_vocab: int | None = None,
                   vocab_corpus: str | os.PathLike | None = None, weights: str = "float32",
                   overwrite: bool = False,
                   progress: Callable[[str], None] = lambda msg: None) -> Manifest:
    """Export the drafter at ``drafter_dir`` (official layout) for the target at
    ``target_model_dir`` into ``out_dir``: ``draft.onnx`` (+ ``adaptor.onnx`` for ViSpec)
    and ``manifest.json``, atomically. ``draft_vocab``: keep only that many target ids in the
    head (``draft_vocab.select_draft_vocab``; ``vocab_corpus`` gives the frequencies).
    ``weights="int8"`` / ``"int4"``: the draft graph's MatMul weights in 8 / 4 bits, for ONNX
    Runtime on CPU (``weight_quant.quantize_matmuls``, blocks of 32)."""
    drafter_dir, target_model_dir = Path(drafter_dir), Path(target_model_dir)
    start = time.perf_counter()
    if weights not in WEIGHTS:
        raise VispecError(f"weights {weights!r}. Expected one of {WEIGHTS}")
    require_weights_runtime(weights, "ort", f"export-drafter --weights {weights}")
    check_opset(opset)
    drafter = load_drafter(drafter_dir, target_model_dir)
    head_size = draft_vocab or drafter.config.vocab_size
    if not 1 <= top_k <= head_size:
        raise VispecError(f"top_k={top_k}. Expected: 1..{head_size} (the drafter head's "
                          f"tokens). Hint: lower --top-k or enlarge --draft-vocab")
    draft_ids = None
    if draft_vocab is not None:
        draft_ids, covered = select_draft_vocab(draft_vocab, target_model_dir, drafter_dir,
                                                drafter.config.vocab_size, vocab_corpus)
        progress(f"draft vocabulary: {draft_vocab} of {drafter.config.vocab_size} tokens, "
                 f"covering {covered:.1%} of the counted tokens")
    graphs = drafter_graphs(drafter, target_lm_head(target_model_dir), top_k=top_k,
                            max_len=max_len, max_image_tokens=max_image_tokens,
                            draft_ids=draft_ids)
    info = ArtifactInfo(kind="drafter", family=drafter.kind, source=drafter_dir,
                        max_len=max_len, opset=opset,
                        model=drafter_manifest_facts(drafter, top_k, target_model_dir,
                                                     draft_vocab, weights))
    return write_artifact(out_dir, info, drafter_jobs(graphs, drafter, weights),
                          inputs=[drafter_dir, target_model_dir], overwrite=overwrite,
                          extras=functools.partial(write_draft_vocab, draft_ids=draft_ids),
                          label="drafter ", started=start, progress=progress)


def drafter_jobs(graphs: dict[str, tuple], drafter: Drafter, weights: str) -> list[GraphJob]:
    """The graph jobs of ``drafter_graphs``, traced on seeded example inputs; the draft
    graph's MatMul weights quantized to ``weights`` unless float."""
    sizes = {NEW: EXAMPLE_NEW, PAST: EXAMPLE_PAST, IMAGE_TOKENS: EXAMPLE_IMAGE_TOKENS}
    rng = np.random.default_rng(0)
    quantize = () if weights == FLOAT else (
        functools.partial(quantize_matmuls, bits=BITS[weights]),
        f"quantizing the draft graph's weights to {weights}")
    return [GraphJob(name, module, spec,
                     example_feeds(spec, sizes, rng,
                                   **fixed_inputs(spec, drafter, rng, EXAMPLE_NEW)),
                     *(quantize if name == DRAFT else ()))
            for name, (module, spec) in graphs.items()]


def write_draft_vocab(folder: Path, draft_ids: np.ndarray | None) -> dict[str, str]:
    """The draft vocabulary's target ids (``DRAFT_VOCAB_FILE``) if the head was cut; it is
    no manifest ``extra_files`` entry (the manifest's ``draft_vocab`` fact names it)."""
    if draft_ids is not None:
        np.save(folder / DRAFT_VOCAB_FILE, draft_ids)
    return {}


# -- parity -----------------------------------------------------------------------------------
@torch.no_grad()
def _torch_outputs(module, spec: GraphSpec, feeds: dict) -> dict[str, np.ndarray]:
    out = module(*(torch.from_numpy(np.array(feeds[n])) for n in spec.input_names))
    out = out if isinstance(out, tuple) else (out,)
    return {name: o.numpy() for name, o in zip(spec.output_names, out)}


def _compare_all(graph: str, case: str, got: dict, want: dict,
                 precision: str) -> list[ParityRow]:
    """Every output under ``precision``'s tolerance. At reduced precision near-ties may swap
    top-k ids, so that row counts the positions whose reference top-1 id is missing from the
    graph's top-k by more than the log-prob error allows (none may be)."""
    rows = [compare(graph, case, name, got[name], want[name], precision)
            for name in want if not (name == TOPK_IDS and precision != "float32")]
    if TOPK_IDS in want and precision != "float32":
        ref_ids, ref_lp = (want[n].reshape(-1, want[n].shape[-1]) for n in (TOPK_IDS, TOPK_LOGPROBS))
        ids, lp = (np.asarray(got[n]).reshape(ref_ids.shape) for n in (TOPK_IDS, TOPK_LOGPROBS))
        slack = tolerance(precision) * float(np.abs(ref_lp).max())
        # missing top-1 r: the graph puts logp(r) below its k-th, the reference at ref_lp[0]
        missing = int(sum(r not in g and ref - last > slack
                          for r, g, ref, last in zip(ref_ids[:, 0], ids, ref_lp[:, 0], lp[:, -1])))
        rows.append(ParityRow(graph, case, f"{TOPK_IDS} (top-1 kept)", missing,
                              missing / len(ref_ids), 0.0, precision=precision))
    return rows


def validate_drafter(drafter_dir: str | os.PathLike, target_model_dir: str | os.PathLike,
                     artifact_dir: str | os.PathLike, *, seed: int = 0) -> list[ParityRow]:
    """Every exported graph under ONNX Runtime vs the PyTorch modules (fp32): the draft
    graph over 12 prefill rows (token, embedded and fused rows mixed), then one row and a
    random 8-32 row tree mask over the real past the prefill rows produced; the adaptor
    over one image. An int8-weight draft graph is held to the int8 tolerance."""
    artifact_dir = Path(artifact_dir)
    manifest = Manifest.load(artifact_dir)
    drafter = load_drafter(drafter_dir, target_model_dir)
    draft_ids = np.load(artifact_dir / DRAFT_VOCAB_FILE) \
        if manifest.model.get("draft_vocab") else None
    weights = manifest.model.get("weights", "float32")
    graphs = drafter_graphs(drafter, target_lm_head(target_model_dir),
                            top_k=manifest.model["top_k"], max_len=manifest.max_len,
                            max_image_tokens=DEFAULT_MAX_IMAGE_TOKENS, draft_ids=draft_ids)
    rng = np.random.default_rng(seed)
    rows = []

    def run(name: str, case: str, feeds: dict) -> dict:
        module, _ = graphs[name]
        entry = manifest.graph(name)
        with make_runner("ort", artifact_dir / entry.file, entry.spec) as runner:
            got = runner.infer(feeds)
        want = _torch_outputs(module, entry.spec, feeds)
        rows.extend(_compare_all(name, case, got, want, weights if name == DRAFT else "float32"))
        return want

    spec = manifest.graph(DRAFT).spec

    def feeds(new: int, past: int) -> dict:
        return example_feeds(spec, {NEW: new, PAST: past}, rng,
                             **fixed_inputs(spec, drafter, rng, new))

    prefill = run(DRAFT, "prefill", feeds(12, 0))
    real_past = {past: prefill[present] for past, present in zip(past_names(0), present_names(0))}
    run(DRAFT, "single", {**feeds(1, 12), **real_past})
    n = int(rng.integers(8, 33))
    tree = feeds(n, 12)
    tree[ATTENTION_MASK] = np.concatenate([np.ones((n, 12), bool), random_tree(rng, n, forest=True)[1]],
                                          axis=1)[None, None]
    run(DRAFT, f"tree{n}", {**tree, **real_past})
    if "adaptor" in graphs:
        image = {IMAGE_EMBEDS: rng.standard_normal((20, drafter.config.hidden_size),
                                                   dtype=np.float32)}
        run("adaptor", "image20", image)
    return rows
