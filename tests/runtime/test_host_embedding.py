"""On host memory a float embedding table is read once through the embed graph and looked up
with numpy (no graph run per decoded token); a quantized table keeps its graph."""
import numpy as np
import onnxruntime

from vispec.runtime.device import HostMemory
from vispec.runtime.specs import INPUT_IDS, INPUTS_EMBEDS
from vispec.runtime.target import EMBED, TargetModel


def _graph_embeddings(artifacts, ids):
    session = onnxruntime.InferenceSession(str(artifacts / "embed.onnx"),
                                           providers=["CPUExecutionProvider"])
    return session.run([INPUTS_EMBEDS], {INPUT_IDS: ids[None]})[0][0]


def test_host_lookup_equals_the_embed_graph(tiny_target):
    _, artifacts = tiny_target("llava")
    target = TargetModel(artifacts)
    assert isinstance(target.memory, HostMemory) and EMBED not in target.runners
    vocab = target.facts["vocab_size"]
    ids = np.array([0, 7, vocab - 1, 7, 3], np.int64)
    np.testing.assert_array_equal(target.embed(ids), _graph_embeddings(artifacts, ids))
    assert target.embed(ids) is not target.embed(ids)  # callers may write image rows in
