"""The session of each drafter kind: its fuse input and how it builds its prompt rows."""
from __future__ import annotations

import numpy as np

from ..drafter_specs import (
    ADAPTOR,
    ADAPTOR_ROWS,
    GLOBAL_FEATURE,
    IMAGE_EMBEDS,
    OFFICIAL_LLAVA15,
    RESIDUAL_INDEX,
)
from ..errors import VispecError
from .layouts import hivis_text_rows, image_runs
from .session import DrafterSession, register


@register
class EagleSession(DrafterSession):
    """EAGLE-2: ``fc(cat(e, f))`` over every prompt row."""

    kind = "eagle"


@register
class VispecSession(DrafterSession):
    """ViSpec: each image run compressed by the adaptor; its last row is the global feature
    g fed to every later row (0 before the first image).

    With ``image_input="official-llava15"`` (the official inference on LLaVA-1.5, which
    builds no image mask) every prompt row is a text row embedded from the token ids, so
    image slots carry the ``<image>`` token's embedding; no adaptor runs and g stays 0.
    """

    kind = "vispec"
    image_inputs = (ADAPTOR, OFFICIAL_LLAVA15)
    official_llava15_family = "llava"  # LLaVA-1.5's model_type

    @classmethod
    def check_image_input(cls, image_input, target) -> None:
        super().check_image_input(image_input, target)
        family = target.glue.model_type
        if image_input == OFFICIAL_LLAVA15 and family != cls.official_llava15_family:
            raise VispecError(f"drafter image input {image_input!r} reproduces the official "
                              f"ViSpec inference on LLaVA-1.5 targets, not on {family!r}. "
                              f"Hint: use {ADAPTOR!r} (the official behaviour on {family!r})")

    def _reset_state(self) -> None:
        self.global_feature = np.zeros((1, self.facts["hidden_size"]), np.float32)  # [1, H]

    def _fuse_inputs(self, level: int) -> dict[str, np.ndarray]:
        return {GLOBAL_FEATURE: self.global_feature}

    def _prefill_rows(self, input_ids, embeds, features, next_embed):
        """Text rows keep their positions; an image run (rows whose next token is an image
        token) becomes ``num_q - 1`` adaptor rows at the run's last positions."""
        if self.image_input == OFFICIAL_LLAVA15:  # EAGLE rows of token embeddings, g = 0
            return super()._prefill_rows(input_ids, self.embed(input_ids), features, next_embed)
        shifted = np.concatenate([embeds[1:], next_embed])  # [L, H] row i <- e_{i+1}
        is_image = np.append(input_ids[1:] == self.target.glue.image_token_id, False)
        num_q = int(self.facts["num_q"])
        rows, positions, start = [], [], 0
        for run_start, run_end in image_runs(is_image):
            if run_end - run_start < num_q - 1:
                raise VispecError(f"an image of {run_end - run_start} tokens is shorter than "
                                  f"the ViSpec adaptor's {num_q - 1} rows")
            rows.append(self._text_rows(shifted[start:run_start], features[start:run_start]))
            positions.append(np.arange(start, run_start))
            image = {IMAGE_EMBEDS: np.ascontiguousarray(shifted[run_start:run_end], np.float32)}
            adapted = self.runners["adaptor"].infer(image)[ADAPTOR_ROWS]  # [num_q, H]
            rows.append(adapted[:-1])
            positions.append(np.arange(run_end - num_q + 1, run_end))
            self.global_feature, start = adapted[-1:].copy(), run_end
        rows.append(self._text_rows(shifted[start:], features[start:]))
        positions.append(np.arange(start, len(input_ids)))
        return np.concatenate(rows), np.concatenate(positions).astype(np.int64)

    def _text_rows(self, embeds: np.ndarray, features: np.ndarray) -> np.ndarray:
        return self._fuse(embeds, features, 0) if len(embeds) else embeds


@register
class HivisSession(DrafterSession):
    """HiViS: image tokens removed from the drafter's rows (family rule for positions);
    residual row 0 for committed rows, row ``level`` (at most the last) in the tree."""

    kind = "hivis"

    def _fuse_inputs(self, level: int) -> dict[str, np.ndarray]:
        index = min(level, int(self.facts["residual_rows"]) - 1)
        return {RESIDUAL_INDEX: np.array([index], np.int64)}

    def _prefill_rows(self, input_ids, embeds, features, next_embed):
        kept, positions = hivis_text_rows(self.target.glue, input_ids)
        shifted = np.concatenate([embeds[kept[1:]], next_embed])  # row j <- e of kept j+1
        return self._fuse(shifted, features[kept], 0), positions
