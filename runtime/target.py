"""The exported target VLM behind a backend: embeddings, vision, and the LM step."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .backends import make_runner
from .errors import ManifestError
from .families import FamilyGlue, Prompt, glue_for
from .kv_cache import KVCache
from .manifest import PROCESSOR_DIR, Manifest
from .processors import load_processor
from .specs import ATTENTION_MASK, HIDDEN_STATES, INPUT_IDS, INPUTS_EMBEDS, LOGITS, POSITION_IDS


@dataclass(frozen=True)
class StepOutput:
    logits: np.ndarray  # [S, V]
    hidden: np.ndarray  # [S, H] final post-norm hidden states


class TargetModel:
    """Loads an artifact folder written by ``export_target`` and runs its graphs.

    The LM step writes the new tokens' K/V in place at ``cache.length``; the caller then
    commits (plain decoding) or compacts (tree acceptance) the cache.
    """

    def __init__(self, artifact_dir: str | os.PathLike, backend: str = "ort",
                 threads: int | None = None):
        self.dir = Path(artifact_dir)
        self.backend, self.threads = backend, threads
        self.manifest = Manifest.load(self.dir)
        if self.manifest.kind != "target":
            raise ManifestError(f"{self.dir} holds a {self.manifest.kind!r} export, not a "
                                f"target. Hint: pass the folder of `vispec-export export`")
        config = json.loads((self.dir / PROCESSOR_DIR / "config.json").read_text())
        self.glue: FamilyGlue = glue_for(config)
        if self.glue.model_type != self.manifest.family:
            raise ManifestError(f"manifest family {self.manifest.family!r} does not match "
                                f"its config ({self.glue.model_type!r}). Hint: re-export")
        self.processor = load_processor(self.dir / PROCESSOR_DIR)
        self.runners = {name: make_runner(backend, self.dir / g.file, g.spec, threads)
                        for name, g in self.manifest.graphs.items()}
        self.extras = {k: np.load(self.dir / f) for k, f in self.manifest.extra_files.items()}
        self.facts = self.manifest.model
        self.dtype = self.manifest.graph("lm").spec.tensor(INPUTS_EMBEDS).np_dtype  # LM + KV

    @property
    def max_len(self) -> int:
        return self.manifest.max_len

    @property
    def eos_token_ids(self) -> set[int]:
        return set(self.facts["eos_token_ids"])

    def new_cache(self) -> KVCache:
        """A KV cache sized for this model's ``max_len`` (allocate once per session)."""
        f = self.facts
        return KVCache(f["num_layers"], f["kv_heads"], f["head_dim"], self.max_len, self.dtype)

    def prepare(self, text: str, images: list | None = None) -> Prompt:
        return self.glue.prepare(self.processor, text, images)

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        """Token embeddings ``[S, H]`` of ``input_ids [S]``."""
        out = self.runners["embed"].infer({INPUT_IDS: np.asarray(input_ids, np.int64)[None]})
        return out[INPUTS_EMBEDS][0]

    def prompt_embeds(self, prompt: Prompt) -> np.ndarray:
        """LM input embeddings of a prompt ``[L, H]``: tokens, with image features placed."""
        embeds = self.embed(prompt.input_ids)
        if prompt.has_images:
            vision = self.runners["vision"]
            out = next(iter(vision.infer(self.glue.vision_feeds(prompt)).values()))
            features = self.glue.image_features(out, prompt, self.extras)
            self.glue.merge(embeds, prompt.input_ids, features)
        return embeds

    def step(self, cache: KVCache, embeds: np.ndarray, position_ids: np.ndarray,
             mask: np.ndarray) -> StepOutput:
        """Run the LM over ``embeds [S, H]`` after the cache's valid rows; the new K/V land
        in the cache at ``[length, length + S)`` (not yet committed)."""
        feeds = {INPUTS_EMBEDS: embeds.astype(self.dtype, copy=False)[None],
                 POSITION_IDS: position_ids,
                 ATTENTION_MASK: mask, **cache.past()}
        out = self.runners["lm"].infer(feeds, cache.present(len(embeds)))
        return StepOutput(out[LOGITS][0], out[HIDDEN_STATES][0])
