"""Qwen2.5-VL vision module: eager and exported ONNX against HF ``get_image_features``."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen2_5_VLForConditionalGeneration

from vispec.exporter.families import export_adapter
from vispec.runtime.families import glue_for
from vispec.runtime.families.base import Prompt
from vispec.runtime.processors import load_processor

ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def tiny(tiny_target):
    """HF model, glue and image processor (56px windows: windowing reorders tokens)."""
    path, _ = tiny_target("qwen2_5_vl")
    config = json.loads((path / "config.json").read_text())
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path).eval()
    return model, glue_for(config), load_processor(path).image_processor


def vision_inputs(tiny, sizes, seed=0):
    """(feeds in spec order as numpy, HF image features) for images of ``sizes`` (h, w)."""
    model, glue, image_processor = tiny
    rng = np.random.default_rng(seed)
    pics = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    processed = dict(image_processor(images=pics, return_tensors="np"))
    feeds = glue.vision_feeds(Prompt(np.zeros(1, np.int64), processed))
    with torch.no_grad():
        ref = model.model.get_image_features(torch.from_numpy(processed["pixel_values"]),
                                             torch.from_numpy(processed["image_grid_thw"]))
    spec = glue.vision_spec(glue.config, max_images=4)
    return [feeds[n] for n in spec.input_names], torch.cat(ref.pooler_output).numpy()


@pytest.mark.parametrize("sizes", [[(112, 112)], [(56, 112), (112, 84)]])
def test_module_matches_hf(tiny, sizes):
    inputs, ref = vision_inputs(tiny, sizes)
    module = export_adapter("qwen2_5_vl")(tiny[0]).vision_module()
    with torch.no_grad():
        out = module(*map(torch.from_numpy, inputs)).numpy()
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)


def test_onnx_matches_hf_at_other_patch_counts(tiny, tmp_path):
    glue = tiny[1]
    spec = glue.vision_spec(glue.config, max_images=4)
    module = export_adapter("qwen2_5_vl")(tiny[0]).vision_module()
    example, _ = vision_inputs(tiny, [(112, 112), (56, 112)])  # 96 patches
    path = tmp_path / "vision.onnx"
    torch.onnx.export(module, tuple(map(torch.from_numpy, example)), path,
                      input_names=spec.input_names, output_names=spec.output_names,
                      dynamic_axes=spec.dynamic_axes(), opset_version=18, dynamo=False)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for sizes in ([(112, 84)], [(84, 112), (56, 56), (112, 112)]):  # 48 and 128 patches
        inputs, ref = vision_inputs(tiny, sizes, seed=1)
        spec.check_inputs(dict(zip(spec.input_names, inputs)))
        (out,) = session.run(spec.output_names, dict(zip(spec.input_names, inputs)))
        np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
