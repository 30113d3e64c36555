"""A drafter behind a backend: its own one-layer KV cache, driven by the speculative loop.

Rows and positions (EAGLE-2 conventions, ``cnets.py``/``cnets_ours.py`` ``topK_genrate``):

- prefill: row i = (f_i, e_{i+1}) at position i, the last row (f_{L-1}, embed(x_L)); kinds
  may drop or compress rows (ViSpec, HiViS), so the cache length (rows) and the next
  position (``max position + 1``) are tracked apart.
- tree: the nodes of depth ``level`` (1 = the root's children) are fed at
  ``next_position + level - 1`` (EAGLE's ``len_posi + i``), each with its parent's drafter
  hidden (the last committed row for level 1); their rows go after the committed cache and
  are dropped when the next round or ``advance`` starts.
- advance: row j = (f of accepted node j, embed(token after it)) at ``next_position + j``.

Every call is one ``draft`` graph call (``drafter_specs``): tree tokens, accepted tokens and
x_L go in as token ids, embedded with the drafter's own table inside the graph; the prompt
rows keep the target's LM-input embeddings (projector outputs at image slots), as the
official code passes them (``EMBEDDED`` rows).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

import numpy as np

from ..backends import make_runner
from ..device import host_batch
from ..drafter_specs import ADAPTOR, DRAFT, EMBEDDED, FEATURES, IMAGE_INPUTS
from ..errors import ManifestError, VispecError
from ..kv_cache import KVCache
from ..manifest import Manifest
from ..masks import causal_mask, tree_mask
from ..specs import (
    ATTENTION_MASK,
    HIDDEN_STATES,
    INPUT_IDS,
    INPUTS_EMBEDS,
    LOGIT_ROWS,
    POSITION_IDS,
    TOPK_IDS,
    TOPK_LOGPROBS,
)
from ..target import TargetModel
from ..weights import FLOAT, require_weights_runtime

_SESSIONS: dict[str, type["DrafterSession"]] = {}


def register(cls: type["DrafterSession"]) -> type["DrafterSession"]:
    """Class decorator: the session class of one drafter kind (the manifest's family)."""
    _SESSIONS[cls.kind] = cls
    return cls


def open_drafter(artifact_dir: str | os.PathLike, target: TargetModel, backend: str = "ort",
                 threads: int | None = None, image_input: str = ADAPTOR) -> "DrafterSession":
    """The session of the drafter exported into ``artifact_dir``, bound to ``target``.

    ``image_input``: what the drafter's prompt rows see of an image (``drafter_specs``):
    ``"adaptor"`` (default) or ``"official-llava15"`` (ViSpec on a LLaVA-1.5 target only).
    """
    artifact_dir = Path(artifact_dir)
    manifest = Manifest.load(artifact_dir, kind="drafter")
    if manifest.family not in _SESSIONS:
        raise ManifestError(f"{artifact_dir}: unknown drafter type {manifest.family!r} "
                            f"(known: {sorted(_SESSIONS)}). Hint: re-export the drafter")
    want, got = manifest.model.get("target_config_hash"), target.manifest.config_hash
    if want != got:
        raise ManifestError(f"the drafter in {artifact_dir} was exported for a target with "
                            f"config hash {want}, but the target in {target.dir} has {got}. "
                            f"Hint: export the drafter against this target model")
    if manifest.max_len < target.max_len:
        raise ManifestError(f"the drafter in {artifact_dir} was exported with max_len "
                            f"{manifest.max_len}, shorter than its target's {target.max_len}: "
                            f"long generations would overflow its cache. Hint: export the "
                            f"drafter again with `export-drafter --max-len {target.max_len}`")
    require_weights_runtime(manifest.model.get("weights", FLOAT), backend,
                            f"the drafter in {artifact_dir}",
                            hint="export the drafter again without --weights")
    session_class = _SESSIONS[manifest.family]
    session_class.check_image_input(image_input, target)
    return session_class(artifact_dir, manifest, target, backend, threads, image_input)


class DrafterSession:
    """Drafter state of one generation: committed cache rows, next position, last hidden.

    Subclasses set ``kind`` and implement the kind-specific parts: ``_fuse_inputs`` (the
    draft graph's extra input) and, where rows are dropped or compressed, ``_prompt_rows``;
    ``image_inputs`` lists the image inputs the kind supports.
    """

    kind: ClassVar[str]
    image_inputs: ClassVar[tuple[str, ...]] = (ADAPTOR,)

    def __init__(self, artifact_dir: Path, manifest: Manifest, target: TargetModel,
                 backend: str, threads: int | None, image_input: str = ADAPTOR):
        self.manifest, self.target, self.facts = manifest, target, manifest.model
        self.image_input = image_input
        if DRAFT not in manifest.graphs:
            raise ManifestError(f"{artifact_dir} was exported by an older vispec-export (graphs "
                                f"{sorted(manifest.graphs)}, no {DRAFT!r}). Hint: export the "
                                f"drafter again with `vispec-export export-drafter`")
        self.runners = {name: make_runner(backend, artifact_dir / g.file, g.spec, threads,
                                          target.memory)
                        for name, g in manifest.graphs.items()}
        self.draft_runner = self.runners[DRAFT]
        # the rows a draft call scores (head + top-k): slices of one range; graphs exported
        # before ``logit_rows`` score every row
        self._scored = np.arange(manifest.max_len, dtype=np.int64) \
            if LOGIT_ROWS in manifest.graph(DRAFT).spec.input_names else None
        self.top_k: int = int(self.facts["top_k"])
        self.cache = KVCache(1, self.facts["kv_heads"], self.facts["head_dim"], manifest.max_len,
                             memory=target.memory)  # on the target's device
        self.next_position = 0
        self.committed = 0                   # cache rows kept across rounds
        self.prompt_end = self.prompt_rows = 0  # prompt rows [0, prompt_end) = cache rows
        self.prefills = 0                    # [0, prompt_rows) of the latest of prefills
        width = self.facts["hidden_size"]
        # Drafter hidden states that feed the next tree level, where the graph runs: row 0 is
        # the last committed row's, then each tree level's rows of this round (grown on use).
        self._rows = self.cache.memory.empty((8, width), np.float32)
        self._no_embeds = self.cache.memory.empty((0, width), np.float32)
        self._reset_state()

    # -- the loop's interface ------------------------------------------------------------------
    def prefill(self, input_ids: np.ndarray, embeds: np.ndarray, features: np.ndarray,
                next_token: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Start a generation from the prompt ``input_ids [L]``; returns the last row's
        (logp [k], ids [k]). ``embeds`` and ``features`` hold the prompt's rows from
        ``start`` on. ``start > 0`` continues the previous prefill, of a prompt this one
        extends: its rows before ``prompt_end`` (= ``start``) are kept, the rest replaced."""
        if start == 0:
            self.cache.reset()
            self._reset_state()
        elif start != self.prompt_end:
            raise ValueError(f"drafter prefill from row {start}, but its previous prompt rows "
                             f"end at {self.prompt_end}")
        else:
            self.cache.truncate(self.prompt_rows)
        ids, rows, feats, positions, extra = self._prompt_rows(
            np.asarray(input_ids), embeds, features, next_token, start)
        top = self._commit(ids, host_batch(rows, np.float32), host_batch(feats, np.float32),
                           positions, extra)
        # The last row embeds x_L by token id: a longer prompt replaces it (and what followed).
        self.prompt_end, self.prompt_rows = len(input_ids) - 1, self.cache.length - 1
        self.prefills += 1
        return top

    def tree_step(self, tokens: np.ndarray, parent_rows: np.ndarray, mask: np.ndarray,
                  level: int) -> tuple[np.ndarray, np.ndarray]:
        """One tree level (``runtime.tree.DraftStep``): logp [K, k] and ids [K, k]."""
        if level == 1:
            self._drop_tree()
        k, r = len(tokens), self.cache.length - self.committed
        if mask.shape != (k, r + k):
            raise ValueError(f"tree mask | shape {mask.shape}. Expected: ({k}, {r + k}) for "
                             f"{k} nodes after {r} tree rows of this round (level {level})")
        memory = self.cache.memory
        self._grow_rows(1 + r + k)
        features = memory.take_rows(self._rows, np.asarray(parent_rows) + 1,  # -1: row 0
                                    "draft:features")
        positions = np.full(k, self.next_position + level - 1, np.int64)
        out = self._draft(tokens, self._zero_embeds(k), features, positions,
                          tree_mask(self.committed, mask),                   # [1,1,K,C+R+K]
                          self._fuse_inputs(level, k),
                          hidden=memory.rows(self._rows, (), 1 + r, 1 + r + k), scored=(0, k))
        self.cache.commit(k)
        return out[TOPK_LOGPROBS][0], out[TOPK_IDS][0]

    def advance(self, features: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Append the accepted rows (f_j, embed(tokens_j)); returns the last row's top-k."""
        self._drop_tree()
        positions = self.next_position + np.arange(len(tokens), dtype=np.int64)
        return self._commit(tokens, self._zero_embeds(len(tokens)),
                            host_batch(features, np.float32), positions)

    def room(self) -> int:
        """Free rows of the cache after the committed ones (tree rows are dropped)."""
        return self.cache.max_len - self.committed

    def _grow_rows(self, rows: int) -> None:
        """Room for ``rows`` hidden rows (row 0 and this round's tree rows are kept)."""
        if self._rows.shape[0] >= rows:
            return
        memory, old = self.cache.memory, self._rows
        self._rows = memory.empty((2 * rows, old.shape[1]), np.float32)
        for row in range(1 + self.cache.length - self.committed):
            memory.copy_row(self._rows, row, old, row)
        memory.release(old)

    def _zero_embeds(self, rows: int):
        """``inputs_embeds [1, rows, H]`` of token-id rows (not read by the graph): zeros
        where the graph runs (nothing crosses to a device), grown on use."""
        memory = self.cache.memory
        if self._no_embeds.shape[0] < rows:
            self._no_embeds = memory.empty((rows, self._no_embeds.shape[1]), np.float32)
        return memory.rows(self._no_embeds, (), 0, rows)

    @classmethod
    def check_image_input(cls, image_input: str, target: TargetModel) -> None:
        """Refuse an image input this kind does not support (before any graph is loaded)."""
        if image_input not in IMAGE_INPUTS:
            raise VispecError(f"drafter image input {image_input!r}. Expected one of "
                              f"{IMAGE_INPUTS}")
        if image_input not in cls.image_inputs:
            raise VispecError(f"drafter image input {image_input!r} does not apply to a "
                              f"{cls.kind} drafter (supported: {cls.image_inputs}). Hint: "
                              f"leave the default {ADAPTOR!r}")

    # -- kind hooks ----------------------------------------------------------------------------
    def _reset_state(self) -> None:
        """Forget kind state carried across rounds (ViSpec's global feature)."""

    def _fuse_inputs(self, level: int, rows: int) -> dict[str, np.ndarray]:
        """The draft graph's extra input for ``rows`` rows of tree ``level`` (0 = committed
        rows)."""
        return {}

    def _prompt_rows(self, input_ids, embeds, features, next_token, start):
        """The prompt rows from ``start`` on, for one draft call: ids ``[N]``
        (``drafter_specs`` row codes), embeddings and features ``[N, H]``, positions ``[N]``
        and the extra input (None: ``_fuse_inputs(0, N)``). EAGLE's shift: row i <-
        (f_i, e_{i+1}), the last row embeds x_L with the drafter's table."""
        return shifted_rows(input_ids[start:], embeds, next_token) + (
            features, np.arange(start, len(input_ids), dtype=np.int64), None)

    # -- graph calls ---------------------------------------------------------------------------
    def _draft(self, ids, embeds, features, positions: np.ndarray, mask: np.ndarray,
               extra: dict, hidden, scored: tuple[int, int]) -> dict:
        """One draft-graph call over ``S`` rows after the cache's rows; K/V land in the cache.
        ``embeds``/``features``: ``[1, S, H]``, tensors of the target's memory or host rows
        that ``prefill``/``advance`` batched; ``extra``: the kind's input (``_fuse_inputs``);
        ``hidden``: where the output hidden states go; ``scored``: the rows [start, end)
        whose top-k it returns (``[1, end - start, k]``)."""
        feeds = {INPUT_IDS: np.asarray(ids, np.int64)[None], INPUTS_EMBEDS: embeds,
                 FEATURES: features, POSITION_IDS: positions[None], ATTENTION_MASK: mask,
                 **self.cache.past(), **extra}
        if self._scored is not None:
            feeds[LOGIT_ROWS] = self._scored[scored[0]:scored[1]]
        outputs = {**self.cache.present(len(positions)), HIDDEN_STATES: hidden}
        return self.draft_runner.infer(feeds, outputs)

    def _commit(self, ids, embeds, features, positions: np.ndarray,
                extra: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        memory, n = self.cache.memory, len(positions)
        out = self._draft(ids, embeds, features, positions, causal_mask(self.cache.length, n),
                          self._fuse_inputs(0, n) if extra is None else extra,
                          hidden=memory.scratch("draft:hidden", (1, n, self._rows.shape[1]),
                                                np.float32), scored=(n - 1, n))
        self.cache.commit(n)
        self.committed = self.cache.length
        self.next_position = int(positions[-1]) + 1
        memory.copy_row(self._rows, 0, out[HIDDEN_STATES], n - 1)  # the last row's hidden
        return out[TOPK_LOGPROBS][0, -1], out[TOPK_IDS][0, -1]

    def _drop_tree(self) -> None:
        self.cache.truncate(self.committed)

    def close(self) -> None:
        """Free the graphs' sessions or engines; hand this drafter's buffers back to the
        target's memory (freed once nothing views them)."""
        for runner in self.runners.values():
            runner.close()
        for tensor in (self.cache.buffer, self._rows, self._no_embeds):
            self.cache.memory.release(tensor)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def shifted_rows(input_ids, embeds: np.ndarray, next_token: int) -> tuple[np.ndarray, np.ndarray]:
    """Row ids and embeddings of EAGLE's shift over ``embeds [L, H]``: row i takes e_{i+1}
    (``EMBEDDED``), the last row x_L's token id."""
    ids = np.full(len(input_ids), EMBEDDED, np.int64)
    ids[-1] = next_token
    return ids, np.concatenate([embeds[1:], embeds[:1]])  # the last row's is not read

