"""A certified screen of a float32 LM head for greedy steps (``screen.onnx``, ONNX Runtime CPU).

A float32 head is ~16% of a decode step of a small model on a CPU. The screen is the head
with its weights rounded to 8 bits per block of 32 inputs (``pack_symmetric``: ``d = max |w|
/ 127``, GGUF Q8_0's grid) in ``MatMulNBits`` at accuracy level 4, which also rounds each
block of 32 activations to int8 at ``s_b = max |h_b| / 127`` (a third of the float head's
time). With ``W~ = d q`` the rounded weights, every logit of row ``v`` obeys::

    |W_v h - screen_v(h)| <= sum_b ||W_vb - W~_vb||_2 ||h_b||_2 + ||W~_vb||_1 s_b / 2

(the first term is 0 where the head is Q8_0 already). With ``screen -/+ bound`` (the bound
widened by ``REL_SLACK`` and ``ABS_SLACK`` for the kernel's float rounding) the greedy token
is among the rows whose upper bound reaches the highest lower bound (the floor): ~3 of 49k
on the demo's target. The graph returns those candidates (bool), the upper bounds and the
floor; the runtime scores the candidates exactly from the float weights (the target's
``lm_head.npy``) and checks the kernel's rounding at load (``runtime.head_screen``).

Written for float32 ``gqa`` targets whose head has no bias and whose hidden size is a
multiple of 32; sampling keeps the float head in the LM graph.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vispec.runtime.specs import (
    GQA,
    HIDDEN_STATES,
    SCREEN_CANDIDATES,
    SCREEN_FLOOR,
    SCREEN_UPPER,
    GraphSpec,
)
from vispec.runtime.weights import FLOAT

from .gqa_lm import MS, OPSETS, value_infos
from .weight_quant import ACCURACY_LEVEL, pack_symmetric

BLOCK = 32  # level 4 rounds activations per block of the weights' block size
REL_SLACK, ABS_SLACK = 2.0 ** -10, 1e-5


def screens(lm_head: torch.nn.Linear, attention: str, weights: str) -> bool:
    """Whether a target gets a head screen: the fused CPU form with float weights, a head
    without bias over a hidden size that is a multiple of ``BLOCK``."""
    return (attention == GQA and weights == FLOAT and lm_head.bias is None
            and lm_head.in_features % BLOCK == 0)


def head_weight(lm_head: torch.nn.Linear) -> np.ndarray:
    """The head's float32 weights ``[V, H]``."""
    return np.ascontiguousarray(lm_head.weight.detach().float().numpy())


def screen_parts(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``weight [V, H]`` -> ``MatMulNBits`` 8-bit data and scales, and ``G [V, 2 H / 32]``:
    the bound is ``G @ [||h_b||_2, max |h_b|]`` over blocks b (module docstring), computed
    in float64."""
    data, scales, _ = pack_symmetric(weight, BLOCK)
    w = weight.astype(np.float64).reshape(len(weight), -1, BLOCK)
    rounded = (data.astype(np.float64) - 128) * scales.astype(np.float64)[..., None]
    return data, scales, np.concatenate([np.sqrt(((w - rounded) ** 2).sum(-1)),
                                         np.abs(rounded).sum(-1) / 254], axis=1)


def build_head_screen(weight: np.ndarray, spec: GraphSpec):
    """The screen's ONNX model for ``spec`` (``hidden_states`` -> ``screen_candidates``,
    ``screen_upper``, ``screen_floor``)."""
    from onnx import helper, numpy_helper

    vocab, hidden = weight.shape
    data, scales, bound = screen_parts(weight)
    inits = {"screen.q8": data, "screen.scales": scales,
             "screen.bound": (bound.T * (1 + REL_SLACK)).astype(np.float32),
             "screen.blocks": np.array([1, -1, hidden // BLOCK, BLOCK], np.int64),
             "screen.slack": np.array(ABS_SLACK, np.float32)}
    nodes = [
        helper.make_node("MatMulNBits", [HIDDEN_STATES, "screen.q8", "screen.scales"], ["z"],
                         name="screen", domain=MS, K=hidden, N=vocab, bits=8, block_size=BLOCK,
                         accuracy_level=ACCURACY_LEVEL),
        helper.make_node("Reshape", [HIDDEN_STATES, "screen.blocks"], ["blocks"], name="blocks"),
        helper.make_node("Abs", ["blocks"], ["magnitude"], name="magnitude"),
        helper.make_node("ReduceMax", ["magnitude"], ["block_max"], name="block_max", axes=[-1],
                         keepdims=0),
        helper.make_node("ReduceL2", ["blocks"], ["block_norm"], name="block_norm", axes=[-1],
                         keepdims=0),
        helper.make_node("Concat", ["block_norm", "block_max"], ["block_sizes"],
                         name="block_sizes", axis=-1),
        helper.make_node("MatMul", ["block_sizes", "screen.bound"], ["rounding"], name="rounding"),
        helper.make_node("Add", ["rounding", "screen.slack"], ["bound"], name="bound"),
        helper.make_node("Sub", ["z", "bound"], ["lower"], name="lower"),
        helper.make_node("Add", ["z", "bound"], [SCREEN_UPPER], name="upper"),
        helper.make_node("ReduceMax", ["lower"], [SCREEN_FLOOR], name="floor", axes=[-1],
                         keepdims=1),
        helper.make_node("GreaterOrEqual", [SCREEN_UPPER, SCREEN_FLOOR], [SCREEN_CANDIDATES],
                         name="candidates"),
    ]
    graph = helper.make_graph(nodes, spec.name, value_infos(spec.inputs),
                              value_infos(spec.outputs),
                              initializer=[numpy_helper.from_array(a, n) for n, a in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in OPSETS],
                             producer_name="vispec-export")


def write_head_screen(lm_head: torch.nn.Linear, spec: GraphSpec, path: str | Path) -> Path:
    """Write the screen of ``lm_head`` to ``path``."""
    import onnx

    onnx.save_model(build_head_screen(head_weight(lm_head), spec), str(path))
    return Path(path)
