"""Drafter ONNX export: graphs match their specs and PyTorch (fp32), manifests, atomicity."""
import os

import pytest

from vispec.exporter.drafters.export import export_drafter, validate_drafter
from vispec.runtime.errors import VispecError
from vispec.runtime.manifest import Manifest, config_hash

GRAPHS = {"eagle": {"draft"}, "vispec": {"draft", "adaptor"},
          "hivis": {"draft"}}


@pytest.mark.parametrize("kind,family", [("eagle", "llava"), ("vispec", "llava"),
                                         ("hivis", "qwen2_5_vl")])
def test_onnx_matches_torch(kind, family, tiny_drafter, tiny_target):
    drafter_dir, artifacts = tiny_drafter(kind, family)
    rows = validate_drafter(drafter_dir, tiny_target(family)[0], artifacts)
    for row in rows:
        print(f"{kind:6s} {row.graph:7s} {row.case:8s} {row.output:15s} max_abs={row.max_abs:.2e}"
              f" rel={row.rel:.2e}")
    assert {r.graph for r in rows} == GRAPHS[kind]
    assert {r.case for r in rows if r.graph == "draft"} >= {"prefill", "single"}
    assert all(r.passed for r in rows), [r for r in rows if not r.passed]


def test_manifest_facts(tiny_drafter, tiny_target):
    drafter_dir, artifacts = tiny_drafter("vispec", "llava")
    manifest = Manifest.load(artifacts)
    assert (manifest.kind, manifest.family) == ("drafter", "vispec")
    assert set(manifest.graphs) == GRAPHS["vispec"]
    facts = manifest.model
    assert facts["target_config_hash"] == config_hash(tiny_target("llava")[0])
    assert manifest.config_hash == config_hash(drafter_dir)
    assert (facts["drafter_type"], facts["num_q"], facts["top_k"]) == ("vispec", 3, 4)
    assert {"hidden_size", "kv_heads", "head_dim", "residual_rows"} <= set(facts)


def test_export_is_atomic(tiny_drafter, tiny_target, tmp_path, monkeypatch):
    drafter_dir, _ = tiny_drafter("eagle", "llava")

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        export_drafter(drafter_dir, tiny_target("llava")[0], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_refuses_existing_output(tiny_drafter, tiny_target):
    drafter_dir, artifacts = tiny_drafter("eagle", "llava")
    with pytest.raises(VispecError, match="already exists"):
        export_drafter(drafter_dir, tiny_target("llava")[0], artifacts)
