"""Exported target graphs vs the HF model in PyTorch, for every family."""
import numpy as np
import onnxruntime as ort
import pytest

from vispec.exporter.fixtures.models import FAMILIES
from vispec.exporter.parity import compare
from vispec.exporter.validate import validate_target
from vispec.runtime.manifest import Manifest


@pytest.mark.parametrize("family", FAMILIES)
def test_every_graph_matches_pytorch(tiny_target, family):
    model_dir, artifacts = tiny_target(family)
    rows = validate_target(model_dir, artifacts, seed=3)
    assert {r.graph for r in rows} == {"embed", "vision", "lm"}
    assert {r.case.split()[0] for r in rows if r.graph == "lm"} == {"prefill", "decode", "tree"}
    assert [r for r in rows if not r.passed] == []


@pytest.mark.parametrize("family", FAMILIES)
def test_onnx_io_is_the_manifest_spec(tiny_target, family):
    _, artifacts = tiny_target(family)
    manifest = Manifest.load(artifacts)
    for entry in manifest.graphs.values():
        session = ort.InferenceSession(str(artifacts / entry.file))
        assert [i.name for i in session.get_inputs()] == entry.spec.input_names
        assert [o.name for o in session.get_outputs()] == entry.spec.output_names
        for value in session.get_inputs():
            declared = entry.spec.tensor(value.name).shape
            assert len(value.shape) == len(declared)
            assert [d for d in value.shape if isinstance(d, int)] == \
                [d for d in declared if isinstance(d, int)]


def test_compare_flags_errors_beyond_tolerance():
    want = np.linspace(-3, 3, 100).astype(np.float32)
    assert compare("g", "c", "o", want + 1e-6, want).passed
    assert not compare("g", "c", "o", want + 1e-2, want).passed
    assert not compare("g", "c", "o", want[:50], want).passed
    assert not compare("g", "c", "o", np.full_like(want, np.nan), want).passed
