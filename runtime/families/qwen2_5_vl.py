"""Qwen2.5-VL (``qwen2_5_vl``) host-side glue: vision-graph inputs and M-RoPE positions.

The HF vision tower decides its attention windows from ``image_grid_thw`` with Python loops,
which no graph can hold. Here the host computes them (numpy ports of transformers'
``vision_utils`` helpers and of ``Qwen2_5_VLModel.get_rope_index``) and the vision graph
takes them as inputs:

    pixel_values [patches, C*T*P*P] ─┐
    vision_position_ids [patches, 2] ├─> vision graph ─> image_features [merged, out_hidden]
    window_index [merged]            │   (original merged-token order, as HF returns it)
    window/full_attention_mask       ┘
        [patches, patches] bool, True = may attend, rows/cols in windowed order
"""
from __future__ import annotations

import functools

import numpy as np

from ..errors import VispecError
from ..specs import IMAGE_FEATURES, PIXEL_VALUES, Dim, GraphSpec, TensorSpec
from .base import FamilyGlue, Prompt, register, runs

# Vision-graph inputs computed on the host.
VISION_POSITION_IDS = "vision_position_ids"      # [patches, 2] (row, col) of each patch
WINDOW_INDEX = "window_index"                    # [merged] windowed order of merged tokens
WINDOW_ATTENTION_MASK = "window_attention_mask"  # [patches, patches] same-window blocks
FULL_ATTENTION_MASK = "full_attention_mask"      # [patches, patches] same-image blocks

# Vision-graph dims.
PATCHES = "patches"  # 14x14 patches of all images of one call
MERGED = "merged"    # image tokens = patches / spatial_merge_size**2

# Profile per image: 1024 patches is a 448x448 image. The graph attends over dense
# [patches, patches] masks, so the range is kept small; real image sizes (thousands of
# patches) need windowed batched attention in the graph first.
MAX_PATCHES_PER_IMAGE = 1024
OPT_PATCHES_PER_IMAGE = 256

_TEXT, _IMAGE = 0, 1  # mm_token_type_ids values


def _merge_unit(vision_config: dict) -> int:
    return int(vision_config["spatial_merge_size"]) ** 2


def _grids(prompt: Prompt) -> list[tuple[int, int, int]]:
    """``image_grid_thw`` rows as (t, h, w) in patches; refuses videos."""
    if any(k.endswith("_videos") or k == "video_grid_thw" for k in prompt.processed):
        raise VispecError("Qwen2.5-VL prompt has video inputs; only images are supported. "
                          "Hint: pass the frames as images")
    grid = prompt.processed.get("image_grid_thw")
    return [] if grid is None else [tuple(int(x) for x in row) for row in np.asarray(grid)]


# -- vision inputs (numpy ports of transformers.vision_utils) ----------------------------------
def vision_position_ids(grids: list, merge: int) -> np.ndarray:
    """(row, col) of every patch in the processor's patch order: ``[patches, 2]`` int64."""
    out = []
    for t, h, w in grids:
        hpos, wpos = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")  # [h, w]
        blocks = (h // merge, merge, w // merge, merge)
        hpos = hpos.reshape(blocks).transpose(0, 2, 1, 3).reshape(-1)
        wpos = wpos.reshape(blocks).transpose(0, 2, 1, 3).reshape(-1)
        out.append(np.tile(np.stack([hpos, wpos], axis=-1), (t, 1)))
    return np.concatenate(out).astype(np.int64)


def window_index(grids: list, merge: int, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Windowed order of the merged tokens ``[merged]`` and each one's window id ``[merged]``.

    ``window`` is the window side in merged tokens; windows tile each frame row-major,
    the last ones cut by the frame's edge.
    """
    order, window_ids, offset, n_windows = [], [], 0, 0
    for t, h, w in grids:
        gh, gw = h // merge, w // merge
        index = np.arange(t * gh * gw).reshape(t, gh, gw)
        win = ((np.arange(gh)[:, None] // window) * -(-gw // window)
               + np.arange(gw) // window).reshape(-1)                 # [gh*gw] window id
        perm = np.argsort(win, kind="stable")  # stable: row-major inside each window
        for f in range(t):
            order.append(index[f].reshape(-1)[perm] + offset)
            window_ids.append(win[perm] + n_windows)
            n_windows += int(win.max()) + 1
        offset += t * gh * gw
    return np.concatenate(order).astype(np.int64), np.concatenate(window_ids)


def _block_mask(segments: np.ndarray) -> np.ndarray:
    """``[N, N]`` True where both tokens are in the same segment."""
    return segments[:, None] == segments[None, :]


@functools.cache
def image_only_processor_class() -> type:
    """Qwen2.5-VL processor with the video part left out (transformers imported on first use).

    The stock class needs ``Qwen2VLVideoProcessor``, which requires torchvision (absent on
    CPU-torch machines and Jetson images). A processor's parts are read from its
    ``__init__`` signature, so leaving ``video_processor`` out of it drops the video part
    from checks, loading and saving.
    """
    from transformers import Qwen2_5_VLProcessor

    class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template,
                             **kwargs)

        def to_dict(self) -> dict:
            """Serialise under the official class name, as real checkpoints are."""
            return {**super().to_dict(), "processor_class": Qwen2_5_VLProcessor.__name__}

    return ImageOnlyQwen2_5_VLProcessor


@register
class Qwen25VLGlue(FamilyGlue):
    """Qwen2.5-VL: windowed ViT with host-side window plan; 3-row M-RoPE positions."""

    model_type = "qwen2_5_vl"
    processor_name = "Qwen2_5_VLProcessor"

    @classmethod
    def processor_class(cls) -> type:
        return image_only_processor_class()
    mrope = True

    @property
    def vision_config(self) -> dict:
        return self.config["vision_config"]

    @classmethod
    def vision_spec(cls, config: dict, max_images: int) -> GraphSpec:
        vc = config["vision_config"]
        unit = _merge_unit(vc)
        patch_dim = (int(vc.get("in_channels", 3)) * int(vc["temporal_patch_size"])
                     * int(vc["patch_size"]) ** 2)
        max_patches = max_images * MAX_PATCHES_PER_IMAGE
        return GraphSpec(
            name="vision",
            inputs=(TensorSpec(PIXEL_VALUES, "float32", (PATCHES, patch_dim)),
                    TensorSpec(VISION_POSITION_IDS, "int64", (PATCHES, 2)),
                    TensorSpec(WINDOW_INDEX, "int64", (MERGED,)),
                    TensorSpec(WINDOW_ATTENTION_MASK, "bool", (PATCHES, PATCHES)),
                    TensorSpec(FULL_ATTENTION_MASK, "bool", (PATCHES, PATCHES))),
            outputs=(TensorSpec(IMAGE_FEATURES, "float32", (MERGED, int(vc["out_hidden_size"]))),),
            dims=(Dim(PATCHES, unit, OPT_PATCHES_PER_IMAGE, max_patches),
                  Dim(MERGED, 1, OPT_PATCHES_PER_IMAGE // unit, max_patches // unit)),
            meta={"spatial_merge_size": int(vc["spatial_merge_size"]),
                  "max_patches_per_image": MAX_PATCHES_PER_IMAGE},
        )

    def vision_feeds(self, prompt: Prompt) -> dict[str, np.ndarray]:
        vc = self.vision_config
        merge, unit = int(vc["spatial_merge_size"]), _merge_unit(vc)
        grids = _grids(prompt)
        pixels = np.asarray(prompt.processed[PIXEL_VALUES], dtype=np.float32)  # [patches, D]
        if not grids or sum(t * h * w for t, h, w in grids) != len(pixels):
            raise VispecError(f"pixel_values has {len(pixels)} patches but image_grid_thw "
                              f"{grids} says otherwise. Hint: use the model's own processor")
        window = int(vc["window_size"]) // merge // int(vc["patch_size"])
        order, window_ids = window_index(grids, merge, window)           # [merged] x2
        image_ids = np.repeat(np.arange(len(grids)), [t * h * w for t, h, w in grids])
        return {
            PIXEL_VALUES: pixels,
            VISION_POSITION_IDS: vision_position_ids(grids, merge),
            WINDOW_INDEX: order,
            WINDOW_ATTENTION_MASK: _block_mask(np.repeat(window_ids, unit)),
            # windowing keeps every image's tokens together, in image order
            FULL_ATTENTION_MASK: _block_mask(image_ids),
        }

    def images_from(self, processed: dict, first: int) -> dict:
        """Image ``first`` on: its ``image_grid_thw`` rows and their patch rows of pixels."""
        grids = np.asarray(processed["image_grid_thw"])
        if first >= len(grids):
            return {}
        skip = int(np.prod(grids[:first], axis=1).sum())
        return {**processed, PIXEL_VALUES: processed[PIXEL_VALUES][skip:],
                "image_grid_thw": grids[first:]}

    # -- drafters ----------------------------------------------------------------------------
    def hivis_text_rows(self, input_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """HiViS on Qwen2.5-VL: <|vision_start|>..<|vision_end|> removed, the text keeps its
        ordinal (a gap)."""
        input_ids = np.asarray(input_ids)
        start = int(self.config["vision_start_token_id"])
        end = int(self.config["vision_end_token_id"])
        inside = np.cumsum(input_ids == start) - np.cumsum(input_ids == end)  # > 0 within a span
        kept = np.flatnonzero((inside == 0) & (input_ids != end))
        return kept, kept.astype(np.int64)

    # -- positions (numpy port of Qwen2_5_VLModel.get_rope_index, images only) ----------------
    def mm_token_type_ids(self, prompt: Prompt) -> np.ndarray:
        """Per token 0 (text) or 1 (image), as the processor's ``mm_token_type_ids``."""
        ids = np.asarray(prompt.input_ids)
        video_id = self.config.get("video_token_id")
        if video_id is not None and np.any(ids == int(video_id)):
            raise VispecError("Qwen2.5-VL prompt has video tokens; only images are supported")
        return np.where(ids == self.image_token_id, _IMAGE, _TEXT)

    def position_ids(self, prompt: Prompt) -> tuple[np.ndarray, int]:
        types = self.mm_token_type_ids(prompt)                           # [L]
        grids = iter(_grids(prompt))
        merge = int(self.vision_config["spatial_merge_size"])
        parts, pos = [], 0
        for kind, start, end in runs(types):
            length = end - start
            if kind == _TEXT:
                parts.append(np.broadcast_to(np.arange(length) + pos, (3, length)))
                pos += length
                continue
            t, h, w = _next_grid(grids)
            gh, gw = h // merge, w // merge
            if t * gh * gw != length:
                raise VispecError(f"an image has {length} <|image_pad|> tokens but its grid "
                                  f"{(t, h, w)} gives {t * gh * gw}. Hint: use the model's "
                                  f"own processor")
            parts.append(np.stack(np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw),
                                               indexing="ij")).reshape(3, -1) + pos)
            pos += max(gh, gw)
        if next(grids, None) is not None:
            raise VispecError("the prompt has fewer images than image_grid_thw rows")
        positions = np.concatenate(parts, axis=1).astype(np.int64)       # [3, L]
        return positions[:, None, :], int(positions.max()) + 1


def _next_grid(grids) -> tuple[int, int, int]:
    grid = next(grids, None)
    if grid is None:
        raise VispecError("the prompt has more images than image_grid_thw rows. Hint: use "
                          "the model's own processor")
    return grid
