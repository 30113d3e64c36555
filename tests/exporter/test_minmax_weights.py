"""int4 min/max weights (``export --weights int4 --weights-method minmax``): on a model whose
weights lie on GGUF's grids (decoder Q4_1: ``min + d q`` per block of 32 inputs, q in 0..15;
head Q8_0) the quantized graph holds the decoder's 4-bit grid exactly and each block's float
part to one 4-bit digit; speculative decoding on it stays exact; what it refuses."""
import shutil

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from vispec.engines.weights_dq import unpack
from vispec.exporter.cli import cli
from vispec.exporter.drafters.export import export_drafter
from vispec.exporter.export import export_target
from vispec.exporter.fixtures.drafters import build_tiny_drafter
from vispec.exporter.fixtures.models import build_tiny_model
from vispec.exporter.parity import TOLERANCES
from vispec.exporter.validate import open_pair, parity_rows
from vispec.exporter.weight_quant import pack_minmax
from vispec.runtime.drafters import open_drafter
from vispec.runtime.manifest import Manifest
from vispec.runtime.specs import LOGITS
from vispec.runtime.target import TargetModel

MAX_LEN = 256
BLOCK = 32


def snap_q4_1(weight: torch.Tensor) -> torch.Tensor:
    """``[out, in]`` onto Q4_1's grid: each block of 32 inputs ``min + d * q``, d = (max -
    min) / 15, q in 0..15 (what dequantizing a GGUF Q4_1 tensor gives)."""
    blocks = weight.reshape(weight.shape[0], -1, BLOCK)
    low = blocks.amin(-1, keepdim=True)
    step = (blocks.amax(-1, keepdim=True) - low) / 15
    return (low + step * torch.round((blocks - low) / step)).reshape(weight.shape)


def snap_q8_0(weight: torch.Tensor) -> torch.Tensor:
    """``[out, in]`` onto Q8_0's grid: ``d * q``, d = max |w| / 127 a block of 32."""
    blocks = weight.reshape(weight.shape[0], -1, BLOCK)
    step = blocks.abs().amax(-1, keepdim=True) / 127
    return (step * torch.round(blocks / step)).reshape(weight.shape)


@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory):
    """The tiny LLaVA with its decoder Linears on Q4_1's grid, its head and embedding on
    Q8_0's (as the demo target's GGUF)."""
    from transformers import LlavaForConditionalGeneration

    out = build_tiny_model("llava", tmp_path_factory.mktemp("gguf") / "model")
    model = LlavaForConditionalGeneration.from_pretrained(out)
    with torch.no_grad():
        layers = model.model.language_model.layers
        for module in layers.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(snap_q4_1(module.weight))
        for table in (model.lm_head, model.model.language_model.embed_tokens):
            table.weight.copy_(snap_q8_0(table.weight))
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def minmax_export(gguf_model, tmp_path_factory):
    """``minmax_export(attention) -> artifacts``, head and embedding quantized too."""
    made = {}

    def get(attention):
        if attention not in made:
            out = tmp_path_factory.mktemp(f"minmax-{attention}") / "artifacts"
            export_target(gguf_model, out, max_len=MAX_LEN, attention=attention, weights="int4",
                          weights_method="minmax", weights_exclude=())
            made[attention] = out
        return made[attention]

    return get


def _set_accuracy_level(path, level: int) -> None:
    model = onnx.load(str(path))
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.name == "accuracy_level":
                attr.i = level
    onnx.save(model, str(path))


def _rebuilt(weight: np.ndarray, digits: int) -> tuple[np.ndarray, np.ndarray]:
    """What ``MatMulNBits`` computes with ``pack_minmax(weight)`` over ``[x, x @ block_sums]``,
    as a ``[N, K]`` weight: (the 4-bit grid part ``d (q - z)``, it plus the float parts)."""
    rows, k = weight.shape
    data, scales, zeros = pack_minmax(weight, BLOCK, digits)
    blocks = scales.shape[1]
    q = unpack(data.reshape(rows, -1), 4, blocks * BLOCK).reshape(rows, blocks, BLOCK) + 8
    z = unpack(zeros.reshape(rows, -1), 4, blocks) + 8
    values = scales[..., None] * (q - z[..., None])
    nb = -(-k // BLOCK)
    grid = values[:, :nb].reshape(rows, -1)[:, :k]
    floats = values[:, nb:].reshape(rows, digits, -1).sum(1)[:, :nb]  # one a block, per digit
    return grid, grid + np.repeat(floats, BLOCK, axis=1)[:, :k]


def test_pack_minmax_keeps_the_q4_1_grid_and_rounds_each_block_float_part():
    """On Q4_1's grid, ``d (q - z)`` is the weight less one constant a block (the float part);
    the extra blocks hold those parts, each further digit ~16x closer."""
    weight = snap_q4_1(torch.randn(48, 160) * 0.05).numpy()
    errors = []
    for digits in (1, 2):
        grid, rebuilt = _rebuilt(weight, digits)
        offsets = (weight - grid).reshape(48, -1, BLOCK)
        assert np.abs(offsets - offsets[..., :1]).max() < 1e-6  # the grid exactly
        assert np.abs(offsets).max() > 1e-3  # (the float parts are not nothing)
        errors.append(np.abs(rebuilt - weight).max() / np.abs(weight).max())
    assert errors[0] < 1e-2 and errors[1] < errors[0] / 8, errors
    ragged = np.random.default_rng(0).standard_normal((5, 70)).astype(np.float32)
    grid, rebuilt = _rebuilt(ragged, 1)  # K not a multiple of the block: padded, same layout
    steps = (ragged.max() - ragged.min()) / 15
    assert np.abs(rebuilt - ragged).max() < steps


@pytest.mark.parametrize("attention", ["standard", "gqa"])
def test_minmax_graph_holds_q4_1_weights(gguf_model, minmax_export, tmp_path, attention):
    """With float activations in MatMulNBits (accuracy level 0) the LM graph is PyTorch
    float32 but for each block's float part in one 4-bit digit: within 3e-2 (measured
    1.4e-2); the head's and the embedding's int8 tables exactly (the embedding within float32's
    bound). As exported (level 4: activations quantized to int8 per block) within 5e-2."""
    artifacts = minmax_export(attention)
    facts = Manifest.load(artifacts).model
    assert (facts["weights"], facts["weights_method"]) == ("int4", "minmax")
    nodes = onnx.load(str(artifacts / "lm.onnx")).graph.node
    nbits = {n.output[0]: (len(n.input), {a.name: a.i for a in n.attribute}["bits"])
             for n in nodes if n.op_type == "MatMulNBits"}
    assert nbits.pop(LOGITS) == (3, 8)  # the head: 8-bit, symmetric
    assert set(nbits.values()) == {(4, 4)}  # 4-bit, with zero points
    if attention == "gqa":  # 2 nodes more a product: 4 a layer (q|k|v, o, gate|up, down)
        added = ("_block_sums", "_extended")
        for i in (0, 1):
            layer = [n.name for n in nodes if n.name.startswith(f"layers.{i}.")]
            assert sum(name.endswith(added) for name in layer) == 4 * 2
    exact = tmp_path / "exact"
    shutil.copytree(artifacts, exact)
    _set_accuracy_level(exact / "lm.onnx", 0)
    rows = parity_rows(open_pair(gguf_model, exact))
    lm = {(r.case, r.output): r.rel for r in rows if r.graph == "lm"}
    assert len(lm) == 9 and max(lm.values()) <= 3e-2, lm
    embed = [r.rel for r in rows if r.graph == "embed"]
    assert embed and max(embed) <= TOLERANCES["float32"]
    exported = [r.rel for r in parity_rows(open_pair(gguf_model, artifacts)) if r.graph == "lm"]
    assert max(exported) < 5e-2  # int8 activations: the int8-weight graph's order


@pytest.mark.parametrize("attention", ["standard", "gqa"])
def test_greedy_speculative_equals_plain_on_the_minmax_target(gguf_model, minmax_export,
                                                              tmp_path, assert_greedy_exact,
                                                              attention):
    drafter = build_tiny_drafter("vispec", gguf_model, tmp_path / "drafter")
    export_drafter(drafter, gguf_model, tmp_path / "drafter-onnx", top_k=4, max_len=MAX_LEN)
    target = TargetModel(minmax_export(attention))
    assert_greedy_exact(target, open_drafter(tmp_path / "drafter-onnx", target))


def test_minmax_is_int4_only(tiny_target, tmp_path):
    model_dir, _ = tiny_target("llava")
    result = CliRunner().invoke(cli, ["export", str(model_dir), str(tmp_path / "out"),
                                      "--weights", "int8", "--weights-method", "minmax"])
    assert result.exit_code == 2 and "Expected int4" in result.output
    assert not (tmp_path / "out").exists()
