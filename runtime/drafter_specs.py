"""IO specs of the drafter graphs (EAGLE, ViSpec, HiViS): fuse, step, and ViSpec's adaptor.

Graph split (every drafter):
  fuse    : target LM-input embeddings + target features (+ global feature | residual
            index) -> fused rows ``[1, new, H]``
  step    : fused rows + 1-D positions + bool mask + one layer's past K/V
            -> drafter hidden ``[1, new, H]``, fused top-k of log_softmax(lm_head(hidden))
            (full-vocabulary logits never leave the graph), the new rows' K/V
  adaptor : (ViSpec only) raw image embeddings ``[tokens, H]`` -> ``[num_q, H]``
  embed   : (only when the checkpoint's ``embed_tokens`` differs from the target's) token
            ids -> the drafter's own embeddings; absent, the target's embed graph serves
"""
from __future__ import annotations

from .specs import (
    ATTENTION_MASK,
    HIDDEN_STATES,
    INPUTS_EMBEDS,
    NEW,
    POSITION_IDS,
    TOPK_IDS,
    TOPK_LOGPROBS,
    Dim,
    GraphSpec,
    TensorSpec,
    embed_spec,
    kv_tensors,
    step_dims,
)

DRAFTER_TYPES = ("eagle", "vispec", "hivis")

FEATURES = "features"                # target's final post-norm hidden states
GLOBAL_FEATURE = "global_feature"    # ViSpec: last adaptor row of the latest image (or 0)
RESIDUAL_INDEX = "residual_index"    # HiViS: row k of the learned residual table
FUSED = "fused"                      # drafter decoder-layer input rows
IMAGE_EMBEDS = "image_embeds"        # ViSpec adaptor input: one image's projector output
ADAPTOR_ROWS = "adaptor_rows"        # ViSpec adaptor output
IMAGE_TOKENS = "image_tokens"        # dim: tokens of one image run
DRAFTER_EMBED = "embed"              # graph: the drafter's own token table (optional)

# What a drafter's prompt rows see of an image (a run-time choice, ViSpec only):
ADAPTOR = "adaptor"                  # projector outputs compressed by the adaptor; g = last row
OFFICIAL_LLAVA15 = "official-llava15"  # official ViSpec on LLaVA-1.5: <image> token
                                       # embeddings as text rows, no adaptor, g = 0
IMAGE_INPUTS = (ADAPTOR, OFFICIAL_LLAVA15)


def fuse_spec(kind: str, hidden_size: int, max_len: int, dtype: str = "float32") -> GraphSpec:
    """The input fusion of drafter ``kind``."""
    if kind not in DRAFTER_TYPES:
        raise ValueError(f"unknown drafter type {kind!r}; expected one of {DRAFTER_TYPES}")
    rows = (1, NEW, hidden_size)
    inputs = [TensorSpec(INPUTS_EMBEDS, dtype, rows), TensorSpec(FEATURES, dtype, rows)]
    if kind == "vispec":
        inputs.append(TensorSpec(GLOBAL_FEATURE, dtype, (1, hidden_size)))
    if kind == "hivis":
        inputs.append(TensorSpec(RESIDUAL_INDEX, "int64", (1,)))
    return GraphSpec(name="fuse", inputs=tuple(inputs),
                     outputs=(TensorSpec(FUSED, dtype, rows),),
                     dims=(Dim(NEW, 1, 8, max_len),), meta={"kind": kind})


def drafter_step_spec(*, hidden_size: int, kv_heads: int, head_dim: int, top_k: int,
                      max_len: int, dtype: str = "float32") -> GraphSpec:
    """The drafter's decoder layer + target LM head + top-k, over its own one-layer cache."""
    kv_in, kv_out = kv_tensors(1, kv_heads, head_dim, dtype)
    return GraphSpec(
        name="step",
        inputs=(TensorSpec(FUSED, dtype, (1, NEW, hidden_size)),
                TensorSpec(POSITION_IDS, "int64", (1, NEW)),
                TensorSpec(ATTENTION_MASK, "bool", (1, 1, NEW, "past+new")),
                *kv_in),
        outputs=(TensorSpec(HIDDEN_STATES, dtype, (1, NEW, hidden_size)),
                 TensorSpec(TOPK_LOGPROBS, "float32", (1, NEW, top_k)),
                 TensorSpec(TOPK_IDS, "int64", (1, NEW, top_k)),
                 *kv_out),
        dims=step_dims(max_len),
        meta={"top_k": top_k, "kv_heads": kv_heads, "head_dim": head_dim},
    )


def adaptor_spec(*, hidden_size: int, num_q: int, max_image_tokens: int,
                 dtype: str = "float32") -> GraphSpec:
    """ViSpec's vision adaptor: learnable queries attend over one image's embeddings."""
    return GraphSpec(
        name="adaptor",
        inputs=(TensorSpec(IMAGE_EMBEDS, dtype, (IMAGE_TOKENS, hidden_size)),),
        outputs=(TensorSpec(ADAPTOR_ROWS, dtype, (num_q, hidden_size)),),
        dims=(Dim(IMAGE_TOKENS, 1, 64, max_image_tokens),),
        meta={"num_q": num_q},
    )


def drafter_embed_spec(*, hidden_size: int, max_len: int, dtype: str = "float32") -> GraphSpec:
    """The drafter's own token embeddings (IO as the target's embed graph)."""
    return embed_spec(hidden_size=hidden_size, max_len=max_len, dtype=dtype, name=DRAFTER_EMBED)
