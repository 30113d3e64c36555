"""Graph IO specs: the one place where tensor names, dtypes and dynamic dims are written.

The exporter derives ``torch.onnx.export`` names and dynamic axes from a :class:`GraphSpec`,
the engine builder derives TensorRT optimization profiles from it, and the runtime derives
buffer shapes and input checks from it. Specs travel in the manifest beside the ONNX files.

A shape entry is an ``int`` (static), a dim name (``"new"``) or a sum of dim names and
integers (``"past+new"``): the attention mask's key axis is ``past + new``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

import numpy as np

from .errors import ShapeError

DTYPES = ("float32", "float16", "int64", "int32", "bool")


@dataclass(frozen=True)
class Dim:
    """A dynamic axis with its (min, opt, max) range, as an engine profile needs it."""

    name: str
    min: int
    opt: int
    max: int

    def __post_init__(self):
        if not (0 <= self.min <= self.opt <= self.max):
            raise ValueError(f"dim {self.name!r}: need 0 <= min <= opt <= max, got "
                             f"({self.min}, {self.opt}, {self.max})")


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output."""

    name: str
    dtype: str
    shape: tuple  # of int | str

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"tensor {self.name!r}: dtype {self.dtype!r} not in {DTYPES}")
        object.__setattr__(self, "shape", tuple(self.shape))

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)


def _terms(entry) -> list:
    return [int(t) if t.strip().lstrip("-").isdigit() else t.strip() for t in str(entry).split("+")]


@dataclass(frozen=True)
class GraphSpec:
    """Inputs, outputs and dynamic dims of one graph."""

    name: str
    inputs: tuple
    outputs: tuple
    dims: tuple
    meta: dict = field(default_factory=dict, compare=False)
    # Parsed once (the runtime checks every call): name -> spec, name -> parsed shape.
    _tensors: dict = field(init=False, repr=False, compare=False)
    _parsed: dict = field(init=False, repr=False, compare=False)
    _dim_sources: dict = field(init=False, repr=False, compare=False)  # dim -> (input, axis)

    def __post_init__(self):
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "outputs", tuple(self.outputs))
        object.__setattr__(self, "dims", tuple(self.dims))
        known = {d.name for d in self.dims}
        names = [t.name for t in self.inputs + self.outputs]
        if len(set(names)) != len(names):
            raise ValueError(f"graph {self.name!r}: duplicate tensor names")
        parsed = {}
        for t in self.inputs + self.outputs:
            parsed[t.name] = tuple(e if isinstance(e, int) else tuple(_terms(e)) for e in t.shape)
            for entry in parsed[t.name]:
                for term in entry if isinstance(entry, tuple) else ():
                    if isinstance(term, str) and term not in known:
                        raise ValueError(f"graph {self.name!r}: tensor {t.name!r} uses "
                                         f"undeclared dim {term!r}")
        object.__setattr__(self, "_tensors", {t.name: t for t in self.inputs + self.outputs})
        object.__setattr__(self, "_parsed", parsed)
        sources = {}
        for t in self.inputs:
            for axis, entry in enumerate(parsed[t.name]):
                if isinstance(entry, tuple) and len(entry) == 1:
                    sources.setdefault(entry[0], (t.name, axis))
        object.__setattr__(self, "_dim_sources", sources)

    # -- lookups -------------------------------------------------------------------------
    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dim(self, name: str) -> Dim:
        for d in self.dims:
            if d.name == name:
                return d
        raise KeyError(f"graph {self.name!r} has no dim {name!r}")

    def tensor(self, name: str) -> TensorSpec:
        if name not in self._tensors:
            raise KeyError(f"graph {self.name!r} has no tensor {name!r}")
        return self._tensors[name]

    # -- shapes --------------------------------------------------------------------------
    def shape(self, name: str, sizes: dict[str, int]) -> tuple[int, ...]:
        """Concrete shape of tensor ``name`` for the given dim sizes."""
        if name not in self._parsed:
            raise KeyError(f"graph {self.name!r} has no tensor {name!r}")
        return tuple(e if isinstance(e, int) else
                     sum(t if isinstance(t, int) else sizes[t] for t in e)
                     for e in self._parsed[name])

    def profile(self, which: str) -> dict[str, tuple[int, ...]]:
        """Input shapes at every dim's ``min``, ``opt`` or ``max`` (an engine profile)."""
        sizes = {d.name: getattr(d, which) for d in self.dims}
        return {t.name: self.shape(t.name, sizes) for t in self.inputs}

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """``torch.onnx.export(dynamic_axes=...)`` form; a sum axis is named by its text."""
        axes = {}
        for t in self.inputs + self.outputs:
            dyn = {i: str(e).replace("+", "_plus_") for i, e in enumerate(t.shape)
                   if isinstance(e, str)}
            if dyn:
                axes[t.name] = dyn
        return axes

    def check_inputs(self, feeds: dict[str, np.ndarray]) -> dict[str, int]:
        """Check names, dtypes, ranks and dim ranges of ``feeds``; return the dim sizes.

        Every problem is collected before raising one :class:`ShapeError`.
        """
        problems, sizes = [], {}
        missing = set(self.input_names) - set(feeds)
        extra = set(feeds) - set(self.input_names)
        if missing or extra:
            problems.append(f"missing inputs {sorted(missing)}, unexpected {sorted(extra)}")
        for t in self.inputs:
            if t.name not in feeds:
                continue
            a = feeds[t.name]
            if a.dtype != t.np_dtype:
                problems.append(f"input {t.name!r} | dtype {a.dtype}. Expected: {t.dtype}")
            if a.ndim != len(t.shape):
                problems.append(f"input {t.name!r} | shape {a.shape}. Expected rank "
                                f"{len(t.shape)}: {t.shape}")
                continue
            for axis, entry in enumerate(self._parsed[t.name]):
                if isinstance(entry, tuple) and len(entry) == 1:
                    prev = sizes.setdefault(entry[0], a.shape[axis])
                    if prev != a.shape[axis]:
                        problems.append(f"input {t.name!r} axis {axis} ({entry[0]}) is "
                                        f"{a.shape[axis]}, other inputs say {prev}")
        for t in self.inputs:
            a = feeds.get(t.name)
            if a is None or a.ndim != len(t.shape):
                continue
            try:
                want = self.shape(t.name, sizes)
            except KeyError:
                continue
            if a.shape != want:
                problems.append(f"input {t.name!r} | shape {a.shape}. Expected {want} "
                                f"from {t.shape}")
        problems += self._out_of_range(sizes)
        if problems:
            raise ShapeError(f"graph {self.name!r}: " + "; ".join(problems))
        return sizes

    def dim_sizes(self, feeds: dict[str, np.ndarray], held: Mapping = MappingProxyType({})
                  ) -> dict[str, int]:
        """The dim sizes read off one input per dim (in ``feeds``, else in ``held``), checked
        against the profile only: for inputs whose names, dtypes and ranks ``check_inputs``
        has already passed."""
        sizes = {dim: (feeds[name] if name in feeds else held[name]).shape[axis]
                 for dim, (name, axis) in self._dim_sources.items()}
        problems = self._out_of_range(sizes)
        if problems:
            raise ShapeError(f"graph {self.name!r}: " + "; ".join(problems))
        return sizes

    def _out_of_range(self, sizes: dict[str, int]) -> list[str]:
        problems = []
        for name, size in sizes.items():
            d = self.dim(name)
            if not d.min <= size <= d.max:
                problems.append(f"dim {name!r} = {size} is outside the graph's profile "
                                f"[{d.min}, {d.max}]. Hint: shorten the input, or re-export "
                                f"with a larger range (--max-len for tokens, --max-images "
                                f"for images)")
        return problems

    # -- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "inputs": [_tensor_dict(t) for t in self.inputs],
            "outputs": [_tensor_dict(t) for t in self.outputs],
            "dims": [{"name": d.name, "min": d.min, "opt": d.opt, "max": d.max}
                     for d in self.dims],
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "GraphSpec":
        return cls(
            name=d["name"],
            inputs=tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in d["inputs"]),
            outputs=tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"]))
                          for t in d["outputs"]),
            dims=tuple(Dim(**x) for x in d["dims"]),
            meta=dict(d.get("meta", {})),
        )


def _tensor_dict(t: TensorSpec) -> dict:
    return {"name": t.name, "dtype": t.dtype, "shape": list(t.shape)}


# ---------------------------------------------------------------------------------------
# Tensor names shared by the graphs of targets and drafters.
INPUT_IDS = "input_ids"
INPUTS_EMBEDS = "inputs_embeds"
POSITION_IDS = "position_ids"
ATTENTION_MASK = "attention_mask"
LOGITS = "logits"
HIDDEN_STATES = "hidden_states"
LOGIT_ROWS = "logit_rows"  # the new rows a gqa LM step's head or a draft graph's top-k runs on
TOPK_LOGPROBS = "topk_logprobs"
TOPK_IDS = "topk_ids"
TOKEN_IDS = "token_ids"
# A head screen's outputs: the rows that may be a row's argmax, every logit's upper bound and
# the highest lower bound (``head_screen``)
SCREEN_CANDIDATES, SCREEN_UPPER, SCREEN_FLOOR = "screen_candidates", "screen_upper", "screen_floor"

# Dims shared by every step graph.
NEW = "new"    # tokens fed this step (prefill length, 1 for decode, tree size)
PAST = "past"  # tokens already in the KV cache
ROWS = "rows"  # rows whose logits (top-k) a gqa LM step (draft graph) computes: LOGIT_ROWS


STANDARD, GQA = "standard", "gqa"  # LM step forms (``kv_tensors``); gqa: ONNX Runtime's fused ops
ATTENTION_FORMS = (STANDARD, GQA)


def past_names(layer: int) -> tuple[str, str]:
    """Names of layer ``layer``'s past key and value inputs."""
    return f"past_key.{layer}", f"past_value.{layer}"


def present_names(layer: int) -> tuple[str, str]:
    """Names of layer ``layer``'s outputs: key and value of the new tokens only."""
    return f"present_key.{layer}", f"present_value.{layer}"


def step_dims(max_len: int, max_new: int | None = None, opt_new: int = 8) -> tuple[Dim, Dim]:
    """The ``new`` and ``past`` dims of a step graph working inside a ``max_len`` cache."""
    max_new = max_len if max_new is None else min(max_new, max_len)
    return (Dim(NEW, 1, min(opt_new, max_new), max_new),
            Dim(PAST, 0, max_len // 2, max_len - 1))


def kv_tensors(num_layers: int, kv_heads: int, head_dim: int, dtype: str,
               attention: str = STANDARD, max_len: int = 0) -> tuple[list, list]:
    """Per-layer past inputs and present outputs.

    ``standard``: past ``[1, past, kv_heads, head_dim]``, present (the new rows only)
    ``[1, new, kv_heads, head_dim]``. Sequence-major: the first ``past`` rows of a
    preallocated ``[max_len, kv_heads, head_dim]`` slab are contiguous, so the runtime binds
    views of its KV buffer directly, and writes the new rows in place.
    ``gqa``: past and present are the whole head-major cache ``[1, kv_heads, max_len,
    head_dim]``, one buffer bound to both; the graph writes the new rows into it.
    """
    if attention not in ATTENTION_FORMS:
        raise ValueError(f"attention {attention!r} not in {ATTENTION_FORMS}")
    past = (1, kv_heads, max_len, head_dim) if attention == GQA else (1, PAST, kv_heads, head_dim)
    new = (1, kv_heads, max_len, head_dim) if attention == GQA else (1, NEW, kv_heads, head_dim)
    ins, outs = [], []
    for layer in range(num_layers):
        ins += [TensorSpec(name, dtype, past) for name in past_names(layer)]
        outs += [TensorSpec(name, dtype, new) for name in present_names(layer)]
    return ins, outs


def lm_step_spec(*, num_layers: int, hidden_size: int, vocab_size: int, kv_heads: int,
                 head_dim: int, max_len: int, mrope: bool, dtype: str = "float32",
                 attention: str = STANDARD, name: str = "lm") -> GraphSpec:
    """The target language model step: serves prefill, decode and tree verification.

    ``attention_mask[0, 0, i, j]`` is True where new token i may attend to key j
    (keys = past then new), so any tree mask can be fed. ``attention``: the graph's form
    and its KV layout (``kv_tensors``); the ``gqa`` form also takes ``logit_rows``, the
    rows the LM head runs on (``logits [1, rows, V]``: a prefill needs its last row's only).
    """
    pos_shape = (3, 1, NEW) if mrope else (1, NEW)
    kv_in, kv_out = kv_tensors(num_layers, kv_heads, head_dim, dtype, attention, max_len)
    dims = step_dims(max_len)
    rows = NEW
    if attention == GQA:
        rows = ROWS
        dims += (Dim(ROWS, 0, dims[0].opt, dims[0].max),)  # 0: a greedy step's screen decides
        kv_in = [TensorSpec(LOGIT_ROWS, "int64", (ROWS,)), *kv_in]
    return GraphSpec(
        name=name,
        inputs=(TensorSpec(INPUTS_EMBEDS, dtype, (1, NEW, hidden_size)),
                TensorSpec(POSITION_IDS, "int64", pos_shape),
                TensorSpec(ATTENTION_MASK, "bool", (1, 1, NEW, f"{PAST}+{NEW}")),
                *kv_in),
        outputs=(TensorSpec(LOGITS, dtype, (1, rows, vocab_size)),
                 TensorSpec(HIDDEN_STATES, dtype, (1, NEW, hidden_size)),
                 *kv_out),
        dims=dims,
        meta={"num_layers": num_layers, "kv_heads": kv_heads, "head_dim": head_dim,
              "hidden_size": hidden_size, "vocab_size": vocab_size, "mrope": mrope,
              "attention": attention},
    )


def embed_spec(*, hidden_size: int, max_len: int, dtype: str = "float32",
               name: str = "embed") -> GraphSpec:
    """Token-embedding lookup: ``input_ids [1, new] -> inputs_embeds [1, new, H]``."""
    return GraphSpec(
        name=name,
        inputs=(TensorSpec(INPUT_IDS, "int64", (1, NEW)),),
        outputs=(TensorSpec(INPUTS_EMBEDS, dtype, (1, NEW, hidden_size)),),
        dims=(Dim(NEW, 1, 8, max_len),),
    )

def argmax_spec(*, vocab_size: int, max_len: int, dtype: str = "float32",
                name: str = "argmax") -> GraphSpec:
    """Greedy choice where the logits are: ``logits [1, new, V] -> token_ids [1, new]``, so
    a device-resident step sends the host a few bytes per token instead of the logits."""
    return GraphSpec(
        name=name,
        inputs=(TensorSpec(LOGITS, dtype, (1, NEW, vocab_size)),),
        outputs=(TensorSpec(TOKEN_IDS, "int64", (1, NEW)),),
        dims=(Dim(NEW, 1, 8, max_len),),
    )


def head_screen_spec(*, hidden_size: int, vocab_size: int, max_len: int,
                     name: str = "screen") -> GraphSpec:
    """A float LM head's greedy screen (``exporter.head_screen``): ``hidden_states [1, new,
    H]`` -> ``screen_candidates`` (bool) and ``screen_upper [1, new, V]``, ``screen_floor
    [1, new, 1]``: every logit is at most its upper bound, a row's largest at least its
    floor, so its argmax is among the candidates (upper bound >= floor)."""
    return GraphSpec(
        name=name,
        inputs=(TensorSpec(HIDDEN_STATES, "float32", (1, NEW, hidden_size)),),
        outputs=(TensorSpec(SCREEN_CANDIDATES, "bool", (1, NEW, vocab_size)),
                 TensorSpec(SCREEN_UPPER, "float32", (1, NEW, vocab_size)),
                 TensorSpec(SCREEN_FLOOR, "float32", (1, NEW, 1))),
        dims=(Dim(NEW, 1, 8, max_len),),
    )


# Vision graphs: pixel inputs in, image embeddings in the language model's input space out.
PIXEL_VALUES = "pixel_values"
IMAGE_FEATURES = "image_features"
