"""The session of each drafter kind: its fusion input and how it builds its prompt rows."""
from __future__ import annotations

import numpy as np

from ..drafter_specs import (
    ADAPTOR,
    ADAPTOR_ROWS,
    DRAFT,
    FUSED_ROW,
    GLOBAL_FEATURE,
    IMAGE_EMBEDS,
    OFFICIAL_LLAVA15,
    RESIDUAL_INDEX,
)
from ..errors import ManifestError, VispecError
from ..families import image_runs
from .session import DrafterSession, register, shifted_rows


@register
class EagleSession(DrafterSession):
    """EAGLE-2: ``fc(cat(e, f))`` over every prompt row."""

    kind = "eagle"


@register
class VispecSession(DrafterSession):
    """ViSpec: each image run compressed by the adaptor; its last row is the global feature
    g fed to every later row (0 before the first image), per row (``[1, rows, H]``), so
    that a prompt's rows, images among them, go in one draft call.

    With ``image_input="official-llava15"`` (the official inference on LLaVA-1.5, which
    builds no image mask) every prompt row is a text row embedded from the token ids, so
    image slots carry the ``<image>`` token's embedding; no adaptor runs and g stays 0.
    """

    kind = "vispec"
    image_inputs = (ADAPTOR, OFFICIAL_LLAVA15)
    official_llava15_family = "llava"  # LLaVA-1.5's model_type

    def __init__(self, artifact_dir, manifest, *args, **kwargs):
        shape = manifest.graph(DRAFT).spec.tensor(GLOBAL_FEATURE).shape
        if len(shape) != 3:
            raise ManifestError(f"{artifact_dir}: its ViSpec draft graph takes one global "
                                f"feature a call ({list(shape)}), an older form. Hint: export "
                                f"the drafter again with `vispec-export export-drafter`")
        super().__init__(artifact_dir, manifest, *args, **kwargs)

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
        self._tiled = (None, self.global_feature[None])  # (g, [1, rows, H] of it)

    def _fuse_inputs(self, level: int, rows: int) -> dict[str, np.ndarray]:
        g, tiled = self._tiled  # g on every row of a call, rebuilt when g or rows grow
        if g is not self.global_feature or tiled.shape[1] < rows:
            tiled = np.repeat(self.global_feature[None], max(rows, 8), axis=1)
            self._tiled = (self.global_feature, tiled)
        return {GLOBAL_FEATURE: tiled[:, :rows]}

    def _prompt_rows(self, input_ids, embeds, features, next_token, start):
        """Text rows keep their positions; an image run (rows whose next token is an image
        token) becomes ``num_q - 1`` adaptor rows (``FUSED_ROW``) at the run's last
        positions. Text rows see the global feature of the latest image before them."""
        positions = np.arange(start, len(input_ids), dtype=np.int64)
        if self.image_input == OFFICIAL_LLAVA15:  # EAGLE rows of token embeddings, g = 0
            ids = np.append(input_ids[start + 1:], next_token).astype(np.int64)
            return ids, np.zeros_like(embeds), features, positions, None
        ids, shifted = shifted_rows(input_ids[start:], embeds, next_token)
        is_image = np.append(input_ids[start + 1:] == self.target.glue.image_token_id, False)
        num_q = int(self.facts["num_q"])
        g = np.repeat(self.global_feature, len(ids), axis=0)  # [rows before compression, H]
        rows, begin = [], 0  # kept rows; first row after the latest image
        for run_start, run_end in image_runs(is_image):
            if run_end - run_start < num_q - 1:
                raise VispecError(f"an image of {run_end - run_start} tokens is shorter than "
                                  f"the ViSpec adaptor's {num_q - 1} rows")
            image = {IMAGE_EMBEDS: np.ascontiguousarray(shifted[run_start:run_end], np.float32)}
            adapted = self.runners["adaptor"].infer(image)[ADAPTOR_ROWS]  # [num_q, H]
            fused = np.arange(run_end - num_q + 1, run_end)  # the adaptor's rows' positions
            shifted[fused], ids[fused] = adapted[:-1], FUSED_ROW
            rows += [np.arange(begin, run_start), fused]
            self.global_feature, begin = adapted[-1:].copy(), run_end
            g[begin:] = self.global_feature
        rows = np.concatenate([*rows, np.arange(begin, len(ids))])
        return (ids[rows], shifted[rows], features[rows], positions[rows],
                {GLOBAL_FEATURE: np.ascontiguousarray(g[rows][None])})


@register
class HivisSession(DrafterSession):
    """HiViS: image tokens removed from the drafter's rows (family rule for positions);
    residual row 0 for committed rows, row ``level`` (at most the last) in the tree."""

    kind = "hivis"

    def _fuse_inputs(self, level: int, rows: int) -> dict[str, np.ndarray]:
        index = min(level, int(self.facts["residual_rows"]) - 1)
        return {RESIDUAL_INDEX: np.array([index], np.int64)}

    def _prompt_rows(self, input_ids, embeds, features, next_token, start):
        kept, positions = self.target.glue.hivis_text_rows(input_ids)
        tail = kept >= start
        rows = kept[tail] - start
        return shifted_rows(rows, embeds[rows], next_token) + (features[rows], positions[tail],
                                                               None)
