"""The drafters' family rules live on the family glue: every family states which rows HiViS
keeps and where they sit."""
import numpy as np
import pytest

from vispec.runtime.errors import VispecError
from vispec.runtime.families import FamilyGlue, supported_model_types
from vispec.runtime.families.base import _REGISTRY

IMAGE, START, END = 9, 7, 8  # <image> / <|image_pad|>, <|vision_start|>, <|vision_end|>


@pytest.mark.parametrize("model_type", supported_model_types())
def test_every_family_states_its_hivis_rule(model_type):
    assert _REGISTRY[model_type].hivis_text_rows is not FamilyGlue.hivis_text_rows


@pytest.mark.parametrize("model_type", ["llava", "llava_next"])
def test_llava_hivis_rows_drop_the_image_and_renumber_the_text(model_type):
    glue = _REGISTRY[model_type]({"model_type": model_type, "image_token_index": IMAGE})
    kept, positions = glue.hivis_text_rows(np.array([1, IMAGE, IMAGE, 2, 3]))
    np.testing.assert_array_equal(kept, [0, 3, 4])
    np.testing.assert_array_equal(positions, [0, 1, 2])


def test_qwen_hivis_rows_drop_the_vision_span_and_keep_the_gap():
    glue = _REGISTRY["qwen2_5_vl"]({"model_type": "qwen2_5_vl", "image_token_id": IMAGE,
                                    "vision_start_token_id": START, "vision_end_token_id": END})
    kept, positions = glue.hivis_text_rows(np.array([1, START, IMAGE, IMAGE, END, 2, 3]))
    np.testing.assert_array_equal(kept, [0, 5, 6])
    np.testing.assert_array_equal(positions, [0, 5, 6])
    assert positions.dtype == np.int64


def test_a_family_without_a_hivis_rule_is_refused_naming_the_known_ones():
    class NewFamily(FamilyGlue):
        model_type = "new_vlm"

    with pytest.raises(VispecError, match=r"HiViS has no image layout for target family "
                                          r"'new_vlm' \(known: \['llava'"):
        NewFamily({"model_type": "new_vlm"}).hivis_text_rows(np.array([1, 2]))
