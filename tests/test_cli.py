"""The CLI: help a new user can act on, and bad input -> one clear error, exit 2, no debris."""
import json
import os
import shutil

import pytest
from click.testing import CliRunner

from vispec.exporter.cli import cli
from vispec.exporter.export import export_target
from vispec.runtime import atomic


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.mark.parametrize("command", ["export", "validate", "build", "generate"])
def test_every_command_has_help(command):
    result = run(command, "--help")
    assert result.exit_code == 0
    assert "Usage:" in result.output and len(result.output.splitlines()) > 5


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir()) if parent.exists() else []


def test_export_missing_model_dir(tmp_path):
    result = run("export", tmp_path / "nope", tmp_path / "out")
    assert result.exit_code == 2
    assert "does not exist" in result.output
    assert _leftovers(tmp_path) == []


def test_export_unsupported_architecture(tmp_path):
    model = tmp_path / "bert"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "bert"}))
    result = run("export", model, tmp_path / "out")
    assert result.exit_code == 2
    assert "unsupported architecture" in result.output and "llava" in result.output
    assert _leftovers(tmp_path) == ["bert"]


def test_export_model_dir_without_weights(tmp_path, tiny_target):
    model_dir, _ = tiny_target("llava")
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken, ignore=shutil.ignore_patterns("*.safetensors"))
    result = run("export", broken, tmp_path / "out")
    assert result.exit_code == 2 and "no weights" in result.output
    assert _leftovers(tmp_path) == ["broken"]


def test_export_refuses_to_overwrite(tmp_path, tiny_target):
    model_dir, _ = tiny_target("llava")
    (tmp_path / "out").mkdir()
    result = run("export", model_dir, tmp_path / "out")
    assert result.exit_code == 2 and "--overwrite" in result.output


def test_failed_rename_leaves_no_partial_output(tmp_path, tiny_target, monkeypatch):
    model_dir, _ = tiny_target("llava")

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", failing_replace)
    with pytest.raises(OSError):
        export_target(model_dir, tmp_path / "out", max_len=64)
    assert _leftovers(tmp_path) == []


def test_generate_prompt_longer_than_max_len(tiny_target):
    _, artifacts = tiny_target("llava")
    result = run("generate", "--model", artifacts, "--prompt", "boat " * 400)
    assert result.exit_code == 2
    assert "max_len" in result.output and "--max-len" in result.output


def test_generate_on_a_checkpoint_folder_says_export_first(tiny_target):
    model_dir, _ = tiny_target("llava")
    result = run("generate", "--model", model_dir, "--prompt", "hi")
    assert result.exit_code == 2 and "export" in result.output


def test_generate_unreadable_image(tiny_target, tmp_path):
    _, artifacts = tiny_target("llava")
    bad = tmp_path / "x.png"
    bad.write_text("not an image")
    result = run("generate", "--model", artifacts, "--prompt", "hi", "--image", bad)
    assert result.exit_code == 2 and "cannot read image" in result.output


@pytest.fixture
def artifact_copy(tiny_target, tmp_path):
    _, artifacts = tiny_target("llava")
    return shutil.copytree(artifacts, tmp_path / "art")


def test_corrupt_manifest(artifact_copy):
    (artifact_copy / "manifest.json").write_text("{not json")
    result = run("generate", "--model", artifact_copy, "--prompt", "hi")
    assert result.exit_code == 2 and "corrupt" in result.output


def test_manifest_naming_a_missing_graph(artifact_copy):
    os.remove(artifact_copy / "lm.onnx")
    result = run("generate", "--model", artifact_copy, "--prompt", "hi")
    assert result.exit_code == 2 and "lm.onnx" in result.output


def test_validate_against_a_different_model(tiny_target):
    _, artifacts = tiny_target("llava")
    other_model, _ = tiny_target("llava_next")
    result = run("validate", other_model, artifacts)
    assert result.exit_code == 2 and "different model" in result.output


def test_generate_prints_text_and_statistics(tiny_target, noise_image, tmp_path):
    _, artifacts = tiny_target("qwen2_5_vl")
    image = tmp_path / "img.png"
    noise_image(56, 84).save(image)
    result = run("generate", "--model", artifacts, "--prompt", "What is it?", "--image", image,
                 "--max-new-tokens", "5")
    assert result.exit_code == 0, result.output
    assert "tok/s" in result.output and "target passes" in result.output


def test_export_drafter_and_generate_speculatively(tiny_target, tmp_path):
    from vispec.exporter.fixtures.drafters import build_tiny_drafter
    model_dir, artifacts = tiny_target("llava")
    drafter = build_tiny_drafter("hivis", model_dir, tmp_path / "drafter")
    result = run("export-drafter", drafter, tmp_path / "onnx", "--target", model_dir, "--max-len", "256")
    assert result.exit_code == 0, result.output
    args = ("generate", "--model", artifacts, "--prompt", "Tell me a story", "--max-new-tokens", "12")
    spec = run(*args, "--drafter", tmp_path / "onnx", "--total-tokens", "12", "--depth", "2")
    plain = run(*args, "--no-draft")
    assert spec.exit_code == 0 and plain.exit_code == 0, spec.output + plain.output
    assert "speculative (hivis" in spec.output and "[plain]" in plain.output
    assert spec.output.splitlines()[0] == plain.output.splitlines()[0]  # same text
    too_wide = run(*args, "--drafter", tmp_path / "onnx", "--top-k", "50")
    assert too_wide.exit_code == 2 and "top-k" in too_wide.output


def test_drafter_of_another_target_is_refused(tiny_target, tiny_drafter):
    _, llava = tiny_target("llava")
    _, qwen_drafter = tiny_drafter("eagle", "qwen2_5_vl")
    result = run("generate", "--model", llava, "--drafter", qwen_drafter, "--prompt", "hi")
    assert result.exit_code == 2 and "exported for a target" in result.output


def test_export_drafter_for_a_mismatched_target(tiny_target, tiny_drafter, tmp_path):
    llava_dir, _ = tiny_target("llava")  # vocab 480; the Qwen drafter's is 512
    qwen_drafter, _ = tiny_drafter("vispec", "qwen2_5_vl")
    result = run("export-drafter", qwen_drafter, tmp_path / "out", "--target", llava_dir)
    assert result.exit_code == 2 and "vocab" in result.output
    assert _leftovers(tmp_path) == []


def test_export_beyond_a_sliding_window_is_refused(tiny_target, tmp_path):
    model_dir, _ = tiny_target("llava_next")
    windowed = shutil.copytree(model_dir, tmp_path / "windowed")
    config = json.loads((windowed / "config.json").read_text())
    config["text_config"]["sliding_window"] = 128
    (windowed / "config.json").write_text(json.dumps(config))
    result = run("export", windowed, tmp_path / "out", "--max-len", "256")
    assert result.exit_code == 2 and "sliding attention window (128)" in result.output
    assert _leftovers(tmp_path) == ["windowed"]


def test_interrupted_demo_leaves_nothing(tmp_path, monkeypatch):
    from vispec.exporter.demo import run as demo

    def interrupt(model, out, **kwargs):
        assert (model / "config.json").exists()  # the tiny model was written (temporarily)
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "export_target", interrupt)
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(tmp_path / "demo", tiny=True)
    assert _leftovers(tmp_path) == []
