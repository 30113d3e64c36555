"""Processor loading for the runtime: local directories only, numpy outputs, no torch."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from vispec.runtime.errors import ModelDirError
from vispec.runtime.families import supported_model_types
from vispec.runtime.processors import load_processor

fixture_models = pytest.importorskip("vispec.exporter.fixtures.models", reason="building the tiny models needs torch")

MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
EXPECTED_KEYS = {
    "llava": {"input_ids", "attention_mask", "pixel_values"},
    "llava_next": {"input_ids", "attention_mask", "pixel_values", "image_sizes"},
    "qwen2_5_vl": {"input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids"},
}

# Runs in a child interpreter where `import torch` fails, as if torch were not installed.
NO_TORCH_SCRIPT = """
import json, socket, sys
sys.modules["torch"] = None
def refuse(*args, **kwargs):
    raise AssertionError("network access attempted")
socket.socket.connect = refuse
import numpy as np
from PIL import Image
from vispec.runtime.processors import load_processor
report = {}
for model_dir in sys.argv[1:]:
    processor = load_processor(model_dir)
    text = processor.apply_chat_template(json.loads(%r), add_generation_prompt=True, tokenize=False)
    out = processor(text=[text], images=[Image.new("RGB", (56, 56), (200, 30, 30))], return_tensors="np")
    report[model_dir] = {key: type(value).__name__ for key, value in out.items()}
report["torch_imported"] = sys.modules.get("torch") is not None
print(json.dumps(report))
""" % json.dumps(MESSAGES)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {family: fixture_models.build_tiny_model(family, root / family) for family in fixture_models.FAMILIES}


def _process(processor):
    text = processor.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    return processor(text=[text], images=[Image.new("RGB", (56, 56))], return_tensors="np")


@pytest.mark.parametrize("family", fixture_models.FAMILIES)
def test_processor_returns_numpy_with_the_family_inputs(model_dirs, family):
    processor = load_processor(model_dirs[family])
    with_image = _process(processor)
    text_only = processor(text=["What is this?"], return_tensors="np")
    assert set(with_image) == EXPECTED_KEYS[family]
    assert all(isinstance(value, np.ndarray) for value in [*with_image.values(), *text_only.values()])
    assert "pixel_values" not in text_only


def test_processors_load_without_torch(model_dirs):
    dirs = [os.fspath(path) for path in model_dirs.values()]
    result = subprocess.run([sys.executable, "-c", NO_TORCH_SCRIPT, *dirs], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report.pop("torch_imported") is False
    assert {key: set(types.values()) for key, types in report.items()} == {d: {"ndarray"} for d in dirs}


def test_qwen_processor_has_no_video_part_and_saves_under_official_name(model_dirs):
    model_dir = model_dirs["qwen2_5_vl"]
    assert not hasattr(load_processor(model_dir), "video_processor")
    saved = json.loads((model_dir / "processor_config.json").read_text())
    assert saved["processor_class"] == "Qwen2_5_VLProcessor"


@pytest.mark.parametrize("family", fixture_models.FAMILIES)
def test_loads_legacy_layout_of_real_checkpoints(model_dirs, family, tmp_path):
    """Hub checkpoints keep the image processor in preprocessor_config.json."""
    legacy = shutil.copytree(model_dirs[family], tmp_path / family)
    processor_config = json.loads((legacy / "processor_config.json").read_text())
    (legacy / "preprocessor_config.json").write_text(json.dumps(processor_config.pop("image_processor")))
    (legacy / "processor_config.json").write_text(json.dumps(processor_config))
    expected, got = (_process(load_processor(path)) for path in (model_dirs[family], legacy))
    assert set(got) == set(expected)
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key])


def test_every_family_has_a_processor():
    assert supported_model_types() == sorted(fixture_models.FAMILIES)


@pytest.mark.parametrize("content,message", [
    (None, "has no config.json"),
    ("{not json", "not valid JSON"),
    ('{"architectures": []}', "no 'model_type'"),
    ('["llava"]', "no 'model_type'"),
])
def test_load_processor_config_errors(tmp_path, content, message):
    if content is not None:
        (tmp_path / "config.json").write_text(content)
    with pytest.raises(ModelDirError, match=message):
        load_processor(tmp_path)


def test_load_processor_missing_directory(tmp_path):
    with pytest.raises(ModelDirError, match="does not exist"):
        load_processor(tmp_path / "missing")


def test_load_processor_rejects_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ModelDirError, match="'gpt2'.*Supported: \\['llava', 'llava_next', 'qwen2_5_vl'\\]"):
        load_processor(tmp_path)
