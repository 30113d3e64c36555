"""Qwen2.5-VL glue: numpy M-RoPE positions and window plan against the HF model."""
import json

import numpy as np
import pytest
from PIL import Image

from vispec.runtime.errors import VispecError
from vispec.runtime.families import glue_for
from vispec.runtime.families.base import Prompt
from vispec.runtime.families.qwen2_5_vl import (
    FULL_ATTENTION_MASK,
    WINDOW_ATTENTION_MASK,
    WINDOW_INDEX,
    Qwen25VLGlue,
)
from vispec.runtime.processors import load_processor

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SIZES = {0: [], 1: [(56, 112)], 2: [(56, 112), (112, 84)]}  # (height, width) per image


@pytest.fixture(scope="module")
def tiny(tiny_target):
    """Tiny Qwen2.5-VL with 56px windows (2x2 merged tokens), so windowing reorders."""
    path, _ = tiny_target("qwen2_5_vl")
    config = json.loads((path / "config.json").read_text())
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(path).eval()
    return config, model, load_processor(path)


def images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


@pytest.mark.parametrize("n_images", sorted(SIZES))
def test_positions_match_hf_get_rope_index(tiny, n_images):
    config, model, processor = tiny
    glue = glue_for(config)
    prompt = glue.prepare(processor, "Describe the picture.", images(SIZES[n_images]))
    types = glue.mm_token_type_ids(prompt)
    np.testing.assert_array_equal(types, prompt.processed["mm_token_type_ids"][0])

    grid = prompt.processed.get("image_grid_thw")
    ref, delta = model.model.get_rope_index(
        torch.from_numpy(prompt.input_ids)[None],
        mm_token_type_ids=torch.from_numpy(prompt.processed["mm_token_type_ids"]),
        image_grid_thw=None if grid is None else torch.from_numpy(grid))
    positions, next_position = glue.position_ids(prompt)
    assert positions.dtype == np.int64 and positions.shape == (3, 1, len(prompt.input_ids))
    np.testing.assert_array_equal(positions, ref.numpy())
    assert next_position == len(prompt.input_ids) + int(delta)
    if n_images:
        assert next_position < len(prompt.input_ids)  # images take fewer positions than tokens


def test_window_plan_matches_hf(tiny):
    config, model, processor = tiny
    glue = glue_for(config)
    prompt = glue.prepare(processor, "Two pictures.", images([(112, 112), (112, 84)]))
    feeds = glue.vision_feeds(prompt)
    vc = model.config.vision_config
    grid = torch.from_numpy(prompt.processed["image_grid_thw"])
    from transformers.vision_utils import get_vision_window_index  # not loaded by the package
    index, cu_windows = get_vision_window_index(
        grid, vc.spatial_merge_size, vc.window_size, vc.patch_size)
    np.testing.assert_array_equal(feeds[WINDOW_INDEX], index.numpy())
    assert not np.array_equal(feeds[WINDOW_INDEX], np.sort(feeds[WINDOW_INDEX]))  # reordered
    sizes = np.diff(cu_windows.numpy())
    expect = np.repeat(np.arange(len(sizes)), sizes)
    np.testing.assert_array_equal(feeds[WINDOW_ATTENTION_MASK], expect[:, None] == expect)
    assert feeds[FULL_ATTENTION_MASK].sum() == 64 ** 2 + 48 ** 2
    glue.vision_spec(config, max_images=2).check_inputs(feeds)


def test_step_positions_repeat_text_position(tiny):
    glue = glue_for(tiny[0])
    step = glue.step_position_ids(10, np.array([0, 1, 1, 2]))
    assert step.shape == (3, 1, 4) and (step == [[[10, 11, 11, 12]]]).all()


def test_video_and_mismatched_grid_are_refused(tiny):
    config = tiny[0]
    glue = Qwen25VLGlue(config)
    video = Prompt(np.array([1, config["video_token_id"], 2]))
    with pytest.raises(VispecError, match="video"):
        glue.position_ids(video)
    image = config["image_token_id"]
    short = Prompt(np.array([1, image, image, 2]), {"image_grid_thw": np.array([[1, 4, 4]])})
    with pytest.raises(VispecError, match="image_pad"):
        glue.position_ids(short)
