"""GPTQ weight rounding: on the grid the export stores exactly, and closer than rounding to
nearest on the inputs it was calibrated for."""
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from vispec.engines.weights_dq import unpack
from vispec.exporter.gptq import block_grid, calibration_prompts, gptq_weight, round_column
from vispec.exporter.weight_quant import pack_minmax, quantize_matmuls
from vispec.runtime.errors import VispecError

GRIDS = [(4, False), (4, True), (8, False)]  # (bits, zero points)


def _problem(seed=0, n=48, k=128, tokens=512):
    """A weight and calibration inputs with correlated, unevenly scaled channels; some rows
    of blocks all of one sign (their grid still holds 0)."""
    g = torch.Generator().manual_seed(seed)
    mix = 3 * torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)
    x = (torch.randn(tokens, k, generator=g) @ mix) * torch.linspace(0.2, 3.0, k)
    w = torch.randn(n, k, generator=g) * 0.05
    w[:4, :32] = w[:4, :32].abs() + 0.01
    w[4:8, 32:64] = -w[4:8, 32:64].abs()
    return w, x


def _rtn(w, bits, block, zero_points):
    grid = block_grid(w, bits, block, zero_points)
    return torch.cat([round_column(w[:, i:i + 1], i, grid, block) for i in range(w.shape[1])], 1)


@pytest.mark.parametrize("bits,zero_points", GRIDS)
def test_gptq_beats_round_to_nearest_on_its_calibration_inputs(bits, zero_points):
    w, x = _problem()
    h = 2 * x.T.double() @ x.double() / len(x)
    q = gptq_weight(w, h, bits, 32, zero_points)
    rtn = _rtn(w, bits, 32, zero_points)
    err_gptq = torch.linalg.norm(x @ (q - w).T)
    err_rtn = torch.linalg.norm(x @ (rtn - w).T)
    assert err_gptq < 0.8 * err_rtn  # measured 0.65-0.67 (act order; 0.82-0.83 in order)
    assert not torch.equal(q, rtn)
    grid = block_grid(w, bits, 32, zero_points)
    levels = q.reshape(len(q), -1, 32) / grid.scale[..., None] + grid.zero[..., None]
    assert torch.allclose(levels, torch.round(levels), atol=1e-4)  # on the grid, nothing between
    assert levels.min() > -1e-4 and levels.max() < grid.top + 1e-4


def test_zero_point_grid_holds_zero_and_each_block_range():
    w, _ = _problem(2)
    grid = block_grid(w, 4, 32, zero_points=True)
    levels = (torch.arange(16)[None, None] - grid.zero[..., None]) * grid.scale[..., None]
    assert torch.all(torch.isclose(levels, torch.zeros(()), atol=1e-7).any(-1))  # 0 is a level
    blocks = w.reshape(len(w), -1, 32)
    assert torch.all(levels.min(-1).values <= blocks.min(-1).values + grid.scale / 2)
    assert torch.all(levels.max(-1).values >= blocks.max(-1).values - grid.scale / 2)


def _matmul_model(q, path):
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, q.shape[1]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.ascontiguousarray(q.T), "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


@pytest.mark.parametrize("bits,block,k", [(4, 32, 128), (8, 64, 128), (4, 64, 160)])
def test_export_stores_symmetric_gptq_weights_exactly(bits, block, k, tmp_path):
    """Round to nearest (ONNX Runtime's quantizer) reproduces GPTQ's values bit for bit: its
    scale is the block's largest-magnitude value over -2^(bits-1), as GPTQ's grid."""
    w, x = _problem(1, k=k)
    q = gptq_weight(w, 2 * x.T.double() @ x.double(), bits, block).numpy()  # [N, K]
    path = tmp_path / "m.onnx"
    _matmul_model(q, path)
    quantize_matmuls(path, bits, block)
    weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    packed = next(v for n, v in weights.items() if n.endswith(f"_Q{bits}"))
    scales = next(v for n, v in weights.items() if n.endswith("_scales")).reshape(len(q), -1)
    width = -(-k // block) * block  # a last partial block stored padded
    values = unpack(packed.reshape(len(q), -1), bits, width).reshape(len(q), -1, block)
    np.testing.assert_array_equal((values * scales[..., None]).reshape(len(q), width)[:, :k], q)


@pytest.mark.parametrize("k,block", [(128, 32), (160, 64)])  # 160: a last partial block
def test_export_stores_zero_point_gptq_weights(k, block, tmp_path):
    """The min/max packing with no float part finds GPTQ's levels, scales and zero points
    again (the held extremes fix them): the same values up to the scale's last bit."""
    w, x = _problem(1, k=k)
    q = gptq_weight(w, 2 * x.T.double() @ x.double(), 4, block, zero_points=True).numpy()
    rows, width = len(q), -(-k // block) * block
    data, scales, zeros = pack_minmax(q, block, digits=0)
    levels = unpack(data.reshape(rows, -1), 4, width).reshape(rows, -1, block) + 8
    points = unpack(zeros.reshape(rows, -1), 4, width // block) + 8
    values = (scales[..., None] * (levels - points[..., None])).reshape(rows, width)[:, :k]
    np.testing.assert_allclose(values, q, rtol=1e-6, atol=1e-9)


def test_calibration_file(tmp_path, noise_image):
    noise_image().save(tmp_path / "a.png")
    (tmp_path / "prompts.txt").write_text("Describe it.\n\na.png\tWhat is here?\n")
    [(text, images), (text2, images2)] = calibration_prompts(tmp_path / "prompts.txt")
    assert (text, images, text2, images2[0].size) == ("Describe it.", [], "What is here?", (56, 56))
    assert len(calibration_prompts(None)) == 12
    (tmp_path / "bad.txt").write_text("missing.png\tWhat?\n")
    with pytest.raises(VispecError, match="cannot read image .*missing.png"):
        calibration_prompts(tmp_path / "bad.txt")


def test_demo_calibration_file_reads_back(tmp_path):
    """The demo target's calibration file: training images with both questions, then the
    built-in text prompts, as ``--calibration`` reads it."""
    from vispec.exporter.demo.real_target import write_calibration
    from vispec.exporter.demo.synthetic_images import DETAIL_QUESTION, QUESTION
    from vispec.exporter.gptq import PROMPTS

    prompts = calibration_prompts(write_calibration(tmp_path, n=2))
    assert [(text, len(images)) for text, images in prompts[:4]] == \
        [(QUESTION, 1), (DETAIL_QUESTION, 1)] * 2
    assert len(prompts) == 4 + len(PROMPTS) and not any(images for _, images in prompts[4:])


@pytest.mark.parametrize("bits,zero_points", GRIDS)
def test_an_all_zero_block_stays_zero(bits, zero_points):
    """Inputs the calibration never saw (zero Hessian) are zeroed: a block of them stays 0,
    its extreme held at no level."""
    w, x = _problem(3)
    x[:, 32:64] = 0
    q = gptq_weight(w, 2 * x.T.double() @ x.double(), bits, 32, zero_points)
    assert torch.all(q[:, 32:64] == 0) and torch.any(q[:, :32] != 0)
