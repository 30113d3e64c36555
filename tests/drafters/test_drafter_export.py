"""Drafter ONNX export: graphs match their specs and PyTorch (fp32), manifests, atomicity,
the rows a draft call scores, when a cached export is current."""
import json
import os
import shutil

import numpy as np
import pytest

from vispec.exporter.demo.real_demo import current_draft_graph
from vispec.exporter.drafters.checkpoint import load_drafter
from vispec.exporter.drafters.export import export_drafter, fixed_inputs, validate_drafter
from vispec.exporter.onnx_io import example_feeds
from vispec.runtime.backends import make_runner
from vispec.runtime.errors import VispecError
from vispec.runtime.manifest import Manifest, config_hash
from vispec.runtime.specs import LOGIT_ROWS, NEW, PAST, TOPK_IDS, TOPK_LOGPROBS

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


def test_scored_rows_are_those_of_every_row(tiny_drafter, tiny_target):
    # logit_rows picks the rows the head and top-k run on: the same values as scoring all
    drafter_dir, artifacts = tiny_drafter("vispec", "llava")
    entry = Manifest.load(artifacts).graph("draft")
    rng = np.random.default_rng(1)
    drafter = load_drafter(drafter_dir, tiny_target("llava")[0])
    feeds = example_feeds(entry.spec, {NEW: 6, PAST: 4}, rng,
                          **fixed_inputs(entry.spec, drafter, rng, 6))
    with make_runner("ort", artifacts / entry.file, entry.spec) as runner:
        every = runner.infer({**feeds, LOGIT_ROWS: np.arange(6)})
        chosen = runner.infer({**feeds, LOGIT_ROWS: np.array([5, 1])})
    for name in (TOPK_LOGPROBS, TOPK_IDS):
        assert chosen[name].shape[1] == 2
        np.testing.assert_allclose(chosen[name], every[name][:, [5, 1]], rtol=1e-5, atol=1e-6)


def test_a_cached_export_is_current_only_with_this_versions_draft_io(tiny_drafter, tmp_path):
    _, artifacts = tiny_drafter("vispec", "llava")
    assert current_draft_graph(artifacts) and not current_draft_graph(tmp_path / "none")
    old = shutil.copytree(artifacts, tmp_path / "old")
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["graphs"]["draft"]["spec"]["inputs"] = [
        t for t in manifest["graphs"]["draft"]["spec"]["inputs"] if t["name"] != LOGIT_ROWS]
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert not current_draft_graph(old)  # exported before logit_rows: export again
