"""Full-sequence PyTorch reference of each drafter's prefill (ViSpec, HiViS, EAGLE-2).

Written the way the official code computes it (whole prompt at once, masks over the
sequence, the drafter's own ``embed_tokens`` for x_L); the runtime's incremental
numpy path must match it. ``image_input="official-llava15"`` builds ViSpec's rows as the
official inference does on LLaVA-1.5 (no image mask).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from vispec.runtime.drafter_specs import ADAPTOR, OFFICIAL_LLAVA15
from vispec.runtime.families import FamilyGlue, image_runs

from .modules import Drafter


@dataclass(frozen=True)
class DrafterRows:
    """Drafter inputs and outputs over its (compressed) rows."""

    fused: torch.Tensor      # [N, H] decoder-layer inputs
    positions: torch.Tensor  # [N] int64
    hidden: torch.Tensor     # [N, H]
    logp: torch.Tensor       # [N, V] log_softmax(lm_head(hidden))
    global_feature: torch.Tensor | None = None  # ViSpec: g after these rows

    def top_k(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k log-probs and ids of the last row."""
        top = torch.topk(self.logp[-1], k)
        return top.values.numpy(), top.indices.numpy()


def run_rows(drafter: Drafter, lm_head_weight: torch.Tensor, fused: torch.Tensor,
             positions: torch.Tensor, mask: torch.Tensor | None = None) -> DrafterRows:
    """The decoder layer over ``fused [N,H]`` at ``positions [N]`` with a bool ``mask [N,N]``
    (causal when None), no past. Differentiable (training uses it)."""
    n, c = fused.shape[0], drafter.config
    mask = torch.ones(n, n).tril().bool() if mask is None else mask
    empty = torch.zeros(1, 0, c.kv_heads, c.head_dim)
    hidden, _, _ = drafter.layer(fused[None], positions[None], mask[None, None], empty, empty)
    logp = torch.log_softmax(hidden[0] @ lm_head_weight.T, dim=-1)
    return DrafterRows(fused, positions, hidden[0], logp)


@torch.no_grad()
def reference_prefill(drafter: Drafter, lm_head_weight: torch.Tensor, glue: FamilyGlue,
                      input_ids: np.ndarray, embeds: np.ndarray, features: np.ndarray,
                      next_token: int, image_input: str = ADAPTOR) -> DrafterRows:
    """Drafter outputs over a prompt (``input_ids [L]``, target LM-input ``embeds [L,H]``,
    target features ``[L,H]``) followed by the target's ``next_token``."""
    x_next = drafter.embed_tokens(torch.tensor([next_token]))  # [1, H]
    fused, positions, g = drafter_rows(drafter, glue, input_ids, embeds, features, x_next,
                                       image_input)
    return replace(run_rows(drafter, lm_head_weight, fused, positions), global_feature=g)


def drafter_rows(drafter: Drafter, glue: FamilyGlue, input_ids, embeds, features,
                 next_embed: torch.Tensor, image_input: str = ADAPTOR):
    """The drafter's fused rows ``[N, H]``, their positions ``[N]`` and ViSpec's g (or
    None) for a prompt followed by a token embedded as ``next_embed [1, H]``."""
    ids = torch.as_tensor(np.asarray(input_ids), device="cpu")  # read on the host (numpy)
    rows = _official_llava15_rows if image_input == OFFICIAL_LLAVA15 else _ROWS[drafter.kind]
    return rows(drafter, glue, ids, torch.as_tensor(embeds), torch.as_tensor(features),
                next_embed)


def _eagle_rows(drafter, glue, ids, e, f, x_next):
    """Row i = (f_i, e_{i+1}) at position i; the last row takes x_L's embedding."""
    shifted = torch.cat([e[1:], x_next])
    return drafter.fuse(shifted[None], f[None])[0], torch.arange(len(ids)), None


def _vispec_rows(drafter, glue, ids, e, f, x_next):
    """EAGLE rows; each run of image rows (x_{i+1} an image token) -> the adaptor:
    ``num_q - 1`` rows at the run's last positions, the last adaptor row -> g."""
    shifted = torch.cat([e[1:], x_next])  # [L, H]
    is_image = torch.cat([ids[1:] == glue.image_token_id, torch.tensor([False], device=ids.device)])
    h = e.shape[1]
    g = torch.zeros(1, h)
    rows, positions, start = [], [], 0
    for run_start, run_end in image_runs(is_image.numpy()):
        text = slice(start, run_start)
        rows.append(drafter.fuse(shifted[None, text], f[None, text], g)[0])
        positions.append(torch.arange(start, run_start))
        adapted = drafter.imadpt(shifted[run_start:run_end])  # [num_q, H]
        rows.append(adapted[:-1])
        positions.append(torch.arange(run_end - len(adapted) + 1, run_end))
        g, start = adapted[-1:], run_end
    rows.append(drafter.fuse(shifted[None, start:], f[None, start:], g)[0])
    positions.append(torch.arange(start, len(ids)))
    return torch.cat(rows), torch.cat(positions), g


def _hivis_rows(drafter, glue, ids, e, f, x_next):
    """EAGLE rows over the text tokens only, residual row 0, the family's positions."""
    kept, positions = glue.hivis_text_rows(ids.numpy())
    kept = torch.as_tensor(kept)
    shifted = torch.cat([e[kept][1:], x_next])
    fused = drafter.fuse(shifted[None], f[kept][None], torch.tensor([0]))[0]
    return fused, torch.as_tensor(positions), None


def _official_llava15_rows(drafter, glue, ids, e, f, x_next):
    """ViSpec as the official inference runs it on LLaVA-1.5: no image mask, so the target's
    embeddings are not passed (``e`` unused) and the drafter embeds every id itself (image
    slots: the ``<image>`` token's row); no adaptor; every row fused with g = 0."""
    shifted = torch.cat([drafter.embed_tokens(ids[1:].to(x_next.device)), x_next])
    g = torch.zeros(1, shifted.shape[1])
    return drafter.fuse(shifted[None], f[None], g)[0], torch.arange(len(ids)), g


_ROWS = {"eagle": _eagle_rows, "vispec": _vispec_rows, "hivis": _hivis_rows}
