"""Manifests: written by export, checked on load; wrong kinds and corruption are clear errors."""
import json
import shutil

import pytest

from vispec.runtime.errors import ManifestError
from vispec.runtime.manifest import Manifest
from vispec.runtime.target import TargetModel


def test_export_records_provenance(tiny_target):
    model_dir, artifacts = tiny_target("qwen2_5_vl")
    m = Manifest.load(artifacts)
    assert m.kind == "target" and m.family == "qwen2_5_vl" and m.model["mrope"] is True
    assert set(m.versions) >= {"torch", "transformers", "onnx", "onnxruntime"}
    assert m.opset == 17 and m.source == str(model_dir.resolve())
    assert m.graph("lm").spec.meta["num_layers"] == m.model["num_layers"]


def test_a_drafter_folder_is_not_a_target(tiny_drafter):
    _, drafter_artifacts = tiny_drafter("eagle", "llava")
    with pytest.raises(ManifestError, match="not a target"):
        TargetModel(drafter_artifacts)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(format="other/9"), "format"),
    (lambda d: d.pop("graphs"), "corrupt"),
    (lambda d: d["graphs"]["lm"]["spec"]["dims"][0].update(min=-1), "corrupt"),
])
def test_corrupt_manifests(tiny_target, tmp_path, edit, message):
    _, artifacts = tiny_target("llava")
    copy = shutil.copytree(artifacts, tmp_path / "a")
    data = json.loads((copy / "manifest.json").read_text())
    edit(data)
    (copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=message):
        Manifest.load(copy)


def test_a_manifest_that_is_not_an_object(tiny_target, tmp_path):
    _, artifacts = tiny_target("llava")
    copy = shutil.copytree(artifacts, tmp_path / "a")
    (copy / "manifest.json").write_text("[1, 2]")
    with pytest.raises(ManifestError, match="corrupt.*a JSON list, expected an object"):
        Manifest.load(copy)


@pytest.mark.parametrize("kind, fact", [("target", "num_layers"), ("target", "eos_token_ids"),
                                        ("drafter", "top_k")])
def test_a_fact_the_runtime_reads_is_missing(tiny_target, tiny_drafter, tmp_path, kind, fact):
    artifacts = tiny_target("llava")[1] if kind == "target" else tiny_drafter("eagle", "llava")[1]
    copy = shutil.copytree(artifacts, tmp_path / "a")
    data = json.loads((copy / "manifest.json").read_text())
    del data["model"][fact]
    (copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=rf"lack \['{fact}'\].*Hint:"):
        Manifest.load(copy, kind=kind)


def test_a_file_is_not_an_artifact_folder(tiny_target):
    _, artifacts = tiny_target("llava")
    with pytest.raises(ManifestError, match="is a file, not a folder"):
        Manifest.load(artifacts / "manifest.json")
