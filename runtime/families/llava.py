"""LLaVA-1.5 (``llava``) and LLaVA-1.6 / NeXT (``llava_next``) host-side glue."""
from __future__ import annotations

import numpy as np

from ..specs import IMAGE_FEATURES, PIXEL_VALUES, Dim, GraphSpec, TensorSpec
from .base import FamilyGlue, Prompt, register

IMAGES = "images"  # dim: images (LLaVA-1.5) or anyres patches (LLaVA-NeXT) per vision call


def _tokens_per_tile(config: dict) -> int:
    vc = config["vision_config"]
    side = vc["image_size"] // vc["patch_size"]
    cls_token = 0 if config.get("vision_feature_select_strategy", "default") == "default" else 1
    return side * side + cls_token


def _text_rows_renumbered(glue: FamilyGlue, input_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HiViS on LLaVA: image tokens removed, the text re-numbered contiguously."""
    kept = np.flatnonzero(np.asarray(input_ids) != glue.image_token_id)
    return kept, np.arange(len(kept), dtype=np.int64)


def _tile_vision_spec(config: dict, max_tiles: int) -> GraphSpec:
    """Vision tower + projector over square tiles ``[tiles, 3, S, S] -> [tiles, P, H]``."""
    vc = config["vision_config"]
    size, hidden = vc["image_size"], config["text_config"]["hidden_size"]
    return GraphSpec(
        name="vision",
        inputs=(TensorSpec(PIXEL_VALUES, "float32", (IMAGES, 3, size, size)),),
        outputs=(TensorSpec(IMAGE_FEATURES, "float32",
                            (IMAGES, _tokens_per_tile(config), hidden)),),
        dims=(Dim(IMAGES, 1, 1, max_tiles),),
    )


@register
class LlavaGlue(FamilyGlue):
    """LLaVA-1.5: one CLIP tile per image, features in placeholder order."""

    model_type = "llava"
    processor_name = "LlavaProcessor"
    hivis_text_rows = _text_rows_renumbered

    @classmethod
    def vision_spec(cls, config: dict, max_images: int) -> GraphSpec:
        return _tile_vision_spec(config, max_images)

    def vision_feeds(self, prompt: Prompt) -> dict[str, np.ndarray]:
        return {PIXEL_VALUES: prompt.processed[PIXEL_VALUES].astype(np.float32)}


@register
class LlavaNextGlue(FamilyGlue):
    """LLaVA-NeXT: anyres tiles per image; host unpads, adds ``image_newline``, packs."""

    model_type = "llava_next"
    processor_name = "LlavaNextProcessor"
    hivis_text_rows = _text_rows_renumbered
    NEWLINE = "image_newline"

    @classmethod
    def vision_spec(cls, config: dict, max_images: int) -> GraphSpec:
        return _tile_vision_spec(config, max_images * (1 + _max_grid_tiles(config)))

    @staticmethod
    def extra_arrays(model) -> dict[str, np.ndarray]:
        return {LlavaNextGlue.NEWLINE: model.model.image_newline.detach().float().numpy()}

    def _grid(self, image_size) -> tuple[int, int]:
        """Tiles (rows, cols) of the anyres grid chosen for an image of ``(h, w)``."""
        from transformers.image_processing_utils import select_best_resolution

        tile = self.config["vision_config"]["image_size"]
        h, w = select_best_resolution(tuple(int(x) for x in image_size),
                                      self.config["image_grid_pinpoints"])
        return h // tile, w // tile

    def vision_feeds(self, prompt: Prompt) -> dict[str, np.ndarray]:
        pixels = prompt.processed[PIXEL_VALUES]  # [n_img, max_tiles, 3, S, S], padded
        counts = [1 + int(np.prod(self._grid(s))) for s in prompt.processed["image_sizes"]]
        tiles = [pixels[i, :n] for i, n in enumerate(counts)]
        return {PIXEL_VALUES: np.concatenate(tiles).astype(np.float32)}

    def image_features(self, vision_out: np.ndarray, prompt: Prompt,
                       extras: dict[str, np.ndarray]) -> np.ndarray:
        sizes = prompt.processed["image_sizes"]
        counts = [1 + int(np.prod(self._grid(s))) for s in sizes]
        per_image = np.split(vision_out, np.cumsum(counts)[:-1])
        return np.concatenate([self._pack(f, s, extras[self.NEWLINE])
                               for f, s in zip(per_image, sizes)])

    def _pack(self, feats: np.ndarray, image_size, newline: np.ndarray) -> np.ndarray:
        """Base tile, then the grid tiles stitched, unpadded, newline-terminated per row."""
        vc = self.config["vision_config"]
        side = vc["image_size"] // vc["patch_size"]
        base, grid = feats[0], feats[1:]  # [P, H], [rows*cols, P, H]
        if len(grid) == 0:
            return np.concatenate([base, newline[None]])
        rows, cols = self._grid(image_size)
        hidden = grid.shape[-1]
        x = grid.reshape(rows, cols, side, side, hidden).transpose(4, 0, 2, 1, 3)
        x = _unpad(x.reshape(hidden, rows * side, cols * side), image_size)
        x = np.concatenate([x, np.broadcast_to(newline[:, None, None],
                                               (hidden, x.shape[1], 1))], axis=2)
        return np.concatenate([base, x.reshape(hidden, -1).T])


def _max_grid_tiles(config: dict) -> int:
    tile = config["vision_config"]["image_size"]
    return max((h // tile) * (w // tile) for h, w in config["image_grid_pinpoints"])


def _unpad(x: np.ndarray, original_size) -> np.ndarray:
    """Crop the letterbox padding of a ``[C, H, W]`` feature map back to the image's
    aspect ratio (the rule of LLaVA-NeXT's ``unpad_image``)."""
    oh, ow = (int(v) for v in original_size)
    ch, cw = x.shape[1:]
    if ow / oh > cw / ch:
        new_h = int(round(oh * (cw / ow), 7))
        pad = (ch - new_h) // 2
        return x[:, pad:ch - pad, :]
    new_w = int(round(ow * (ch / oh), 7))
    pad = (cw - new_w) // 2
    return x[:, :, pad:cw - pad]
