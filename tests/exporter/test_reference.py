"""The PyTorch reference runs quietly: no deprecation notice on every export's validation."""
import warnings

import pytest

from vispec.exporter.loading import load_target
from vispec.exporter.reference import hf_greedy, hf_lm, hf_prompt_embeds
from vispec.runtime.processors import load_processor


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_the_reference_forward_prints_no_future_warning(tiny_target, family):
    model_dir, _ = tiny_target(family)
    adapter, glue = load_target(model_dir)
    prompt = glue.prepare(load_processor(model_dir), "Describe the boat.")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hf_lm(adapter, hf_prompt_embeds(adapter, glue, prompt), glue.position_ids(prompt)[0])
        hf_greedy(adapter, prompt, 2)
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == []
