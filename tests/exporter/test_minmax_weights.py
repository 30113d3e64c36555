"""int4 min/max weights (``export --weights int4 --weights-method minmax``): on a model whose
weights lie on GGUF's grids (decoder Q4_1: ``min + d q`` per block of 32 inputs, q in 0..15;
head Q8_0) the quantized graph is the float model, to float32 tolerance; speculative decoding
on it stays exact; where it may go (TensorRT) and what it refuses."""
import shutil

import onnx
import pytest
import torch
from click.testing import CliRunner

from vispec.exporter.cli import cli
from vispec.exporter.drafters.export import export_drafter
from vispec.exporter.export import export_target
from vispec.exporter.fixtures.drafters import build_tiny_drafter
from vispec.exporter.fixtures.models import build_tiny_model
from vispec.exporter.parity import TOLERANCES
from vispec.exporter.validate import open_pair, parity_rows
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


@pytest.mark.parametrize("attention", ["standard", "gqa"])
def test_minmax_graph_holds_q4_1_weights_exactly(gguf_model, minmax_export, tmp_path, attention):
    """The 4-bit products and their block-minimum offsets are the float weights: with float
    activations in MatMulNBits (accuracy level 0) the graph is PyTorch float32 within float32's
    bound; as exported (level 4: activations quantized to int8 per block) within 5e-2."""
    artifacts = minmax_export(attention)
    facts = Manifest.load(artifacts).model
    assert (facts["weights"], facts["weights_method"]) == ("int4", "minmax")
    nodes = onnx.load(str(artifacts / "lm.onnx")).graph.node
    nbits = {n.output[0]: {a.name: a.i for a in n.attribute} for n in nodes
             if n.op_type == "MatMulNBits"}
    [head] = [a for out, a in nbits.items() if out == LOGITS]
    assert head["bits"] == 8
    assert {a["bits"] for out, a in nbits.items() if out != LOGITS} == {4}
    # each 4-bit product: MatMulNBits -> Split(y, blocksum) -> MatMul(offsets) -> Add
    assert sum(n.op_type == "Add" for n in nodes) >= 4 * 2  # 2 layers, 4 products each
    if attention == "gqa":  # 3 nodes more a product: 4 a layer (q|k|v, o, gate|up, down)
        added = ("_blocksum", "_mins", "_add_mins")
        for i in (0, 1):
            layer = [n.name for n in nodes if n.name.startswith(f"layers.{i}.")]
            assert sum(name.endswith(added) for name in layer) == 4 * 3
    exact = tmp_path / "exact"
    shutil.copytree(artifacts, exact)
    _set_accuracy_level(exact / "lm.onnx", 0)
    rows = parity_rows(open_pair(gguf_model, exact))
    lm = [r.rel for r in rows if r.graph == "lm"]
    assert lm and max(lm) <= TOLERANCES["float32"], max(lm)
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
