"""The session of each drafter kind: its fusion input and how it builds its prompt rows."""
from __future__ import annotations

import numpy as np

from ..drafter_specs import (
    ADAPTOR,
    ADAPTOR_ROWS,
    FUSED_ROW,
    GLOBAL_FEATURE,
    IMAGE_EMBEDS,
    OFFICIAL_LLAVA15,
    RESIDUAL_INDEX,
)
from ..errors import VispecError
from ..families import image_runs
from .session import DrafterSession, register, shifted_rows


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

    def _prefill_chunks(self, input_ids, embeds, features, next_token, start):
        """Text rows keep their positions; an image run (rows whose next token is an image
        token) becomes ``num_q - 1`` adaptor rows (``FUSED_ROW``) at the run's last
        positions. One chunk per image (ending with its adaptor rows) and one for the text
        after the last: text rows see the global feature of the latest image before them."""
        positions = np.arange(start, len(input_ids), dtype=np.int64)
        if self.image_input == OFFICIAL_LLAVA15:  # EAGLE rows of token embeddings, g = 0
            ids = np.append(input_ids[start + 1:], next_token).astype(np.int64)
            yield ids, np.zeros_like(embeds), features, positions
            return
        ids, shifted = shifted_rows(input_ids[start:], embeds, next_token)
        is_image = np.append(input_ids[start + 1:] == self.target.glue.image_token_id, False)
        num_q = int(self.facts["num_q"])
        begin = 0  # first row of the next chunk
        for run_start, run_end in image_runs(is_image):
            if run_end - run_start < num_q - 1:
                raise VispecError(f"an image of {run_end - run_start} tokens is shorter than "
                                  f"the ViSpec adaptor's {num_q - 1} rows")
            image = {IMAGE_EMBEDS: np.ascontiguousarray(shifted[run_start:run_end], np.float32)}
            adapted = self.runners["adaptor"].infer(image)[ADAPTOR_ROWS]  # [num_q, H]
            rows = np.r_[begin:run_start, run_end - num_q + 1:run_end]  # text, then adaptor
            chunk = shifted[rows]
            chunk[run_start - begin:] = adapted[:-1]
            chunk_ids = ids[rows]
            chunk_ids[run_start - begin:] = FUSED_ROW
            if len(rows):
                yield chunk_ids, chunk, features[rows], positions[rows]
            self.global_feature, begin = adapted[-1:].copy(), run_end
        yield ids[begin:], shifted[begin:], features[begin:], positions[begin:]


@register
class HivisSession(DrafterSession):
    """HiViS: image tokens removed from the drafter's rows (family rule for positions);
    residual row 0 for committed rows, row ``level`` (at most the last) in the tree."""

    kind = "hivis"

    def _fuse_inputs(self, level: int) -> dict[str, np.ndarray]:
        index = min(level, int(self.facts["residual_rows"]) - 1)
        return {RESIDUAL_INDEX: np.array([index], np.int64)}

    def _prefill_chunks(self, input_ids, embeds, features, next_token, start):
        kept, positions = self.target.glue.hivis_text_rows(input_ids)
        tail = kept >= start
        rows = kept[tail] - start
        yield shifted_rows(rows, embeds[rows], next_token) + (features[rows], positions[tail])
