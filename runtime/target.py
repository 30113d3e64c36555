"""The exported target VLM behind a backend: embeddings, vision, and the LM step."""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .backends import default_memory, make_runner
from .device import DeviceTensor, HostMemory, Memory, host_batch, is_device
from .errors import ManifestError, VispecError
from .families import FamilyGlue, Prompt, glue_for
from .greedy_steps import GreedySteps
from .head_screen import HEAD_WEIGHTS, MAX_ROWS, SCREEN, HeadScreen
from .kv_cache import KVCache
from .manifest import Manifest
from .processors import load_artifact_processor
from .specs import (
    ATTENTION_MASK,
    GQA,
    HIDDEN_STATES,
    IMAGE_FEATURES,
    INPUT_IDS,
    INPUTS_EMBEDS,
    LOGIT_ROWS,
    LOGITS,
    NEW,
    POSITION_IDS,
    ROWS,
    STANDARD,
    TOKEN_IDS,
)
from .weights import FLOAT, has_8bit_kernels, require_weights_runtime, weight_graphs

ARGMAX = "argmax"  # optional graph: the greedy choice on the device
EMBED = "embed"
# A row lookup and an argmax: run on the calling thread. A pool of their own would sleep
# through each LM step and wake for every token (~0.2 ms a decode step on a 2-core CPU).
ONE_THREAD = (EMBED, ARGMAX)
# Steps of up to this many rows (decode steps, trees) feed their host inputs from buffers of
# the target's own, one per input and shape: the runner finds them bound already. Right after
# an LM run each binding cost ~0.03-0.07 ms of a ~5 ms int4 decode step (cold caches).
KEPT_ROWS = 64


@dataclass(frozen=True)
class StepOutput:
    """One LM step's ``logits [1, S, V]`` and final hidden states ``[1, S, H]``: numpy
    arrays, or device tensors of which only what the host asks for crosses (valid until the
    target's next step, which reuses the device scratch)."""

    raw_logits: np.ndarray | DeviceTensor
    raw_hidden: np.ndarray | DeviceTensor
    memory: Memory
    argmax_runner: object = None  # the target's argmax graph, used for device tensors
    first_logit_row: int = 0  # rows before it have no logits (``step(last_logits=True)``)
    screen: HeadScreen | None = None  # a greedy step's chooser (of rows from
    # ``first_logit_row`` on): no logits were computed

    @property
    def logits(self) -> np.ndarray:
        """``[S, V]`` on the host (the whole tensor crosses when it lives on a device);
        rows from ``first_logit_row`` on."""
        self._require_logits()
        return self.memory.to_host(self.raw_logits)[0]

    def _require_logits(self) -> None:
        if self.screen is not None:
            raise ValueError("this step ran for greedy tokens only (its head screen chose "
                             "them): no logits. Hint: step with greedy=False for logits")

    @property
    def hidden(self) -> np.ndarray:
        """``[S, H]`` on the host."""
        return self.memory.to_host(self.raw_hidden)[0]

    def logits_row(self, row: int) -> np.ndarray:
        """``logits[row]`` ``[V]`` (a negative row counts from the end): only that row
        crosses."""
        self._require_logits()
        if row >= 0:
            row -= self.first_logit_row
            if row < 0:
                raise ValueError(f"row {row + self.first_logit_row}: this step computed "
                                 f"logits from row {self.first_logit_row} on")
        return self.memory.rows_to_host(self.raw_logits, [row])[0]

    def hidden_rows(self, rows) -> np.ndarray:
        """``hidden[rows]``: only those rows cross."""
        return self.memory.rows_to_host(self.raw_hidden, rows)

    def argmax(self) -> np.ndarray:
        """The greedy token of every row ``[S]``, reduced on the device when possible."""
        if self.screen is not None:
            return self.screen.argmax(self.hidden[self.first_logit_row:])
        if is_device(self.raw_logits) and self.argmax_runner is not None:
            return self.argmax_runner.infer({LOGITS: self.raw_logits})[TOKEN_IDS][0]
        return np.argmax(self.logits, axis=-1)


def paired(embeds: np.ndarray, position_ids: np.ndarray, mask: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An odd pass's inputs with one more row after the last (its embedding again at the
    next position, seeing every key; no other row sees it): its K/V land after the pass's
    rows, where the next pass writes over them."""
    n = embeds.shape[1]
    grown = np.zeros((*mask.shape[:2], n + 1, mask.shape[3] + 1), mask.dtype)
    grown[:, :, :n, :-1] = mask
    grown[:, :, n] = True
    return (np.concatenate([embeds, embeds[:, -1:]], axis=1),
            np.concatenate([position_ids, position_ids[..., -1:] + 1], axis=-1), grown)


class TargetModel:
    """Loads an artifact folder written by ``export_target`` and runs its graphs.

    The LM step writes the new tokens' K/V in place at ``cache.length``; the caller then
    commits (plain decoding) or compacts (tree acceptance) the cache. ``memory`` holds the
    caches and step tensors: numpy on the CPU, device allocations on CUDA backends (by
    default per backend, ``backends.default_memory``); ``traffic`` counts what crosses.
    The graphs' tensors are ``[1, S, ...]`` wherever they live; the host reads and hands in
    ``[S, ...]`` rows (``embed``, ``prompt_embeds``, ``step``, ``StepOutput``).
    ``keep_spinning`` (ONNX Runtime on a CPU): the LM's thread pool spins on between steps
    instead of stopping at each run's end, for a target no drafter alternates with (plain
    int4 decoding ~5% faster on a quiet 2-core CPU; a drafter's runs beside the spinning
    workers took ~10-30% longer, so ``Pipeline`` asks for it without a drafter). Not
    where a head screen runs after each step (its own pool would meet the same fight).
    ``exact`` (host memory): every pass after a prompt's runs an even number of rows (an
    odd one gets a padding row, ``paired``), so a row's arithmetic does not depend on how
    rows are grouped into passes (ONNX Runtime's CPU kernels compute an odd pass's last row
    apart), and speculation verifies chains only (``tree_policy``): greedy speculative
    output then equals plain output bit for bit, on quantized targets too (which part at
    near-ties otherwise; ``runtime.ties``).
    """

    def __init__(self, artifact_dir: str | os.PathLike, backend: str = "ort",
                 threads: int | None = None,
                 memory: Memory | None = None, keep_spinning: bool = False,
                 exact: bool = False):
        self.dir = Path(artifact_dir)
        self.backend, self.threads = backend, threads
        self.manifest = Manifest.load(self.dir, kind="target")
        require_weights_runtime(  # before any device memory is set up
            self.manifest.model.get("weights", FLOAT), backend, f"the target in {self.dir}",
            built="tensorrt" in self.manifest.versions,
            hint="export again without --weights, or build TensorRT engines from an "
                 "`export --weights int4 --weights-block 64` folder")
        self.attention = self.manifest.model.get("attention", STANDARD)
        self.memory = memory or default_memory(backend)
        if self.attention == GQA and not isinstance(self.memory, HostMemory):
            raise ManifestError(f"the target in {self.dir} is in ONNX Runtime's fused CPU form "
                                f"(--attention gqa): it runs on the CPU backend (ort) with host "
                                f"memory. Hint: export again with --attention standard for "
                                f"{backend} or device memory")
        if exact and not isinstance(self.memory, HostMemory):
            raise VispecError(f"exact decoding pads passes on the host: {backend} with device "
                              f"memory cannot. Hint: drop exact, or use host memory")
        self.exact = exact
        self.traffic = self.memory.traffic
        config, self.processor = load_artifact_processor(self.dir)
        self.glue: FamilyGlue = glue_for(config)
        if self.glue.model_type != self.manifest.family:
            raise ManifestError(f"manifest family {self.manifest.family!r} does not match "
                                f"its config ({self.glue.model_type!r}). Hint: re-export")
        keep_spinning = keep_spinning and SCREEN not in self.manifest.graphs
        self.runners = {name: make_runner(backend, self.dir / g.file, g.spec,
                                          1 if name in ONE_THREAD else threads, self.memory,
                                          keep_spinning=keep_spinning and name == "lm")
                        for name, g in self.manifest.graphs.items() if name != SCREEN}
        self.extras = {k: np.load(self.dir / f, mmap_mode="r" if k == HEAD_WEIGHTS else None)
                       for k, f in self.manifest.extra_files.items()}  # the head: rows as read
        self.facts = self.manifest.model
        lm = self.manifest.graph("lm").spec
        self.dtype = lm.tensor(INPUTS_EMBEDS).np_dtype  # LM + KV
        self.selects_logits = LOGIT_ROWS in lm.input_names  # the LM head runs on chosen rows
        self._rows = np.arange(self.max_len, dtype=np.int64)  # LOGIT_ROWS feeds: slices
        self._kept: dict[tuple, np.ndarray] = {}  # (input, shape, dtype) -> buffer (``_keep``)
        self._table = self._host_table()
        self.screen = self._head_screen()
        self._greedy: GreedySteps | None = None

    @property
    def max_len(self) -> int:
        return self.manifest.max_len

    @property
    def eos_token_ids(self) -> set[int]:
        return set(self.facts["eos_token_ids"])

    def new_cache(self) -> KVCache:
        """A KV cache sized for this model's ``max_len`` (allocate once per session), laid
        out as the LM graph's form binds it."""
        f = self.facts
        return KVCache(f["num_layers"], f["kv_heads"], f["head_dim"], self.max_len, self.dtype,
                       self.memory, heads_major=self.attention == GQA)

    def prepare(self, text: str, images: list | None = None) -> Prompt:
        return self.glue.prepare(self.processor, text, images)

    def embed(self, input_ids: np.ndarray) -> np.ndarray:
        """Token embeddings ``[S, H]`` of ``input_ids [S]``, on the host."""
        return self.memory.to_host(self._embed(input_ids))[0]

    def _host_table(self) -> np.ndarray | None:
        """Every token's embedding ``[V, H]``, read once through the embed graph (which is
        then closed), where the LM reads host arrays and the table is float: a decode step's
        lookup is then a numpy index instead of a graph run (~0.1 ms a token on a CPU,
        against a ~5 ms int4 step). None elsewhere: the graph embeds."""
        if not isinstance(self.memory, HostMemory) or EMBED in weight_graphs(self.facts):
            return None
        runner = self.runners.pop(EMBED)
        chunk = runner.spec.dim(NEW).max
        ids = np.arange(self.facts["vocab_size"], dtype=np.int64)
        table = np.concatenate([runner.infer({INPUT_IDS: ids[None, i:i + chunk]})[INPUTS_EMBEDS][0]
                                for i in range(0, len(ids), chunk)])
        runner.close()
        return table

    def _head_screen(self) -> HeadScreen | None:
        """The float head's greedy screen where the export wrote one, ONNX Runtime has its
        8-bit kernels and they keep its bounds (a warning and the float head otherwise)."""
        weight = self.extras.pop(HEAD_WEIGHTS, None)
        if SCREEN not in self.manifest.graphs or not has_8bit_kernels():
            return None
        graph = self.manifest.graph(SCREEN)
        screen = HeadScreen(make_runner(self.backend, self.dir / graph.file, graph.spec,
                                        self.threads, self.memory), weight)
        if screen.holds():
            return screen
        warnings.warn(f"the LM head screen of {self.dir} does not bound this machine's "
                      f"8-bit MatMulNBits kernel: greedy steps run the float head",
                      RuntimeWarning, stacklevel=3)
        screen.close()
        return None

    def _embed(self, input_ids) -> np.ndarray | DeviceTensor:
        """Token embeddings ``[1, S, H]`` where the LM reads them."""
        ids = np.asarray(input_ids, np.int64)[None]
        if self._table is not None:
            return self._table[ids]
        out = self.runners[EMBED].infer({INPUT_IDS: ids},
                                        self._scratch(EMBED, (INPUTS_EMBEDS,), ids.shape[1]))
        return out[INPUTS_EMBEDS]

    def prompt_embeds(self, prompt: Prompt) -> np.ndarray:
        """LM input embeddings of a prompt ``[L, H]``: tokens, with image features placed."""
        embeds = self.embed(prompt.input_ids)
        if prompt.has_images:
            vision = self.runners["vision"]
            out = vision.infer(self.glue.vision_feeds(prompt))[IMAGE_FEATURES]
            features = self.glue.image_features(out, prompt, self.extras)
            self.glue.merge(embeds, prompt.input_ids, features)
        return embeds

    def step(self, cache: KVCache, embeds: np.ndarray, position_ids: np.ndarray,
             mask: np.ndarray, last_logits: bool = False, greedy: bool = False) -> StepOutput:
        """Run the LM over the host rows ``embeds [S, H]`` after the cache's valid rows; the
        new K/V land in the cache at ``[length, length + S)`` (not yet committed).
        ``last_logits``: only the last row's logits are wanted (a prompt's prefill); a graph
        that can (``selects_logits``) skips the LM head on the others. ``greedy``: only
        ``argmax()`` is wanted, which a target with a head screen computes without the
        float head for up to ``head_screen.MAX_ROWS`` rows (the output then has no logits)."""
        return self._step(cache, host_batch(embeds, self.dtype), position_ids, mask,
                          last_logits, greedy)

    def step_tokens(self, cache: KVCache, input_ids, position_ids: np.ndarray,
                    mask: np.ndarray, greedy: bool = False) -> StepOutput:
        """``step`` over tokens: their embeddings stay where the LM reads them (on the
        device for device memory); ``greedy`` as ``step``'s."""
        return self._step(cache, self._embed(input_ids), position_ids, mask, greedy=greedy)

    def _step(self, cache: KVCache, embeds: np.ndarray | DeviceTensor, position_ids: np.ndarray,
              mask: np.ndarray, last_logits: bool = False, greedy: bool = False) -> StepOutput:
        """The LM over ``embeds [1, S, H]`` in ``memory``; ``greedy``: the screen chooses
        where it serves."""
        n = embeds.shape[1]
        if self.exact and n % 2 and not last_logits and cache.length + n < cache.max_len:
            embeds, position_ids, mask = paired(embeds, position_ids, mask)
        rows = embeds.shape[1]  # n, or n + 1 with a padding row (no logits, not returned)
        greedy = greedy and self.screen is not None and (1 if last_logits else n) <= MAX_ROWS
        feeds = {INPUTS_EMBEDS: embeds, POSITION_IDS: position_ids, ATTENTION_MASK: mask}
        sizes, first = {NEW: rows}, 0
        if self.selects_logits:
            first = n - 1 if last_logits else 0
            feeds[LOGIT_ROWS] = self._rows[n if greedy else first:n]
            sizes[ROWS] = 0 if greedy else n - first
        if rows <= KEPT_ROWS:
            for name in (INPUTS_EMBEDS, POSITION_IDS, LOGIT_ROWS):
                if name in feeds and not is_device(feeds[name]):
                    feeds[name] = self._keep(name, feeds[name])
        outputs = self._scratch("lm", (LOGITS, HIDDEN_STATES), sizes)
        past, present = cache.past(), cache.present(rows)
        if cache.heads_major:  # the same slabs every step: bound once
            out = self.runners["lm"].infer(feeds, outputs, held=(past, present))
        else:
            out = self.runners["lm"].infer({**feeds, **past}, {**outputs, **present})
        logits, hidden = out[LOGITS], out[HIDDEN_STATES]
        if rows > n:
            hidden, logits = hidden[:, :n], logits if self.selects_logits else logits[:, :n]
        return StepOutput(logits, hidden, self.memory, self.runners.get(ARGMAX), first,
                          self.screen if greedy else None)

    def greedy_steps(self, cache: KVCache) -> GreedySteps | None:
        """Greedy one-token steps on ``cache`` with every buffer bound once (``greedy_steps``),
        where they serve: ONNX Runtime, the ``gqa`` form, a host embedding table, no head
        screen (which chooses greedy tokens without the float head); two rows a step where
        ``exact``. None elsewhere."""
        runner = self.runners["lm"]
        if (not hasattr(runner, "bound_step") or self._table is None or not cache.heads_major
                or self.screen is not None):
            return None
        if self._greedy is None or self._greedy.cache is not cache:  # kept for the last cache
            self._greedy = GreedySteps(runner, self._table, cache, self.selects_logits,
                                       2 if self.exact else 1)
        return self._greedy

    def _keep(self, name: str, array: np.ndarray) -> np.ndarray:
        """``array`` copied into the target's buffer for LM input ``name`` at its shape."""
        key = (name, array.shape, array.dtype)  # a wrong dtype stays wrong: the spec check says so
        kept = self._kept.get(key)
        if kept is None:
            kept = self._kept[key] = np.empty(array.shape, array.dtype)
        np.copyto(kept, array)
        return kept

    def _scratch(self, graph: str, names: tuple[str, ...], sizes: dict[str, int] | int) -> dict:
        """``memory`` scratch for outputs ``names`` of ``graph`` at ``sizes`` (an int: that
        many ``new`` tokens)."""
        spec = self.runners[graph].spec
        sizes = {NEW: sizes} if isinstance(sizes, int) else sizes
        return {name: self.memory.scratch(name, spec.shape(name, sizes),
                                          spec.tensor(name).np_dtype) for name in names}

    def close(self) -> None:
        """Free the graphs' sessions or engines and every buffer of ``memory`` (the caches
        and step tensors, drafters' included); the model is unusable afterwards."""
        for runner in self.runners.values():
            runner.close()
        if self.screen is not None:
            self.screen.close()
        self.memory.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
