"""IO specs of the drafter graphs (EAGLE, ViSpec, HiViS): draft, and ViSpec's adaptor.

  draft   : one call per prompt, tree level or advance. Row inputs: ``input_ids`` [1, new],
            ``inputs_embeds`` and ``features`` [1, new, H]; per row, the id says what the
            embedding is: a token id >= 0 is embedded with the drafter's own table (tree
            tokens, accepted tokens, x_L); ``EMBEDDED`` (-1) takes ``inputs_embeds`` as the
            row's embedding (the target's LM-input embeddings of the prompt); ``FUSED_ROW``
            (-2) takes ``inputs_embeds`` as the decoder-layer input itself (ViSpec's adaptor
            rows). Then the kind's fusion (+ global feature | residual index), the decoder
            layer over 1-D positions, a bool mask and its one-layer past K/V, the LM head
            (the target's, or a draft vocabulary of it) and a fused top-k on the rows
            ``logit_rows`` names (a tree level: all; a prompt or the accepted rows: the last):
            -> drafter hidden [1, new, H], top-k log-probs and target ids [1, rows, k], the
            new rows' K/V. Full-vocabulary logits never leave the graph.
  adaptor : (ViSpec only) raw image embeddings ``[tokens, H]`` -> ``[num_q, H]``
"""
from __future__ import annotations

from .specs import (
    ATTENTION_MASK,
    HIDDEN_STATES,
    INPUT_IDS,
    INPUTS_EMBEDS,
    LOGIT_ROWS,
    NEW,
    POSITION_IDS,
    ROWS,
    TOPK_IDS,
    TOPK_LOGPROBS,
    Dim,
    GraphSpec,
    TensorSpec,
    kv_tensors,
    step_dims,
)

DRAFTER_TYPES = ("eagle", "vispec", "hivis")

FEATURES = "features"                # target's final post-norm hidden states
GLOBAL_FEATURE = "global_feature"    # ViSpec, per row: last adaptor row of the latest image (or 0)
RESIDUAL_INDEX = "residual_index"    # HiViS: row k of the learned residual table
IMAGE_EMBEDS = "image_embeds"        # ViSpec adaptor input: one image's projector output
ADAPTOR_ROWS = "adaptor_rows"        # ViSpec adaptor output
IMAGE_TOKENS = "image_tokens"        # dim: tokens of one image run
DRAFT = "draft"                      # graph: embed + fuse + layer + head + top-k
EMBEDDED = -1                        # input id: inputs_embeds is the row's token embedding
FUSED_ROW = -2                       # input id: inputs_embeds is the row's layer input

# What a drafter's prompt rows see of an image (a run-time choice, ViSpec only):
ADAPTOR = "adaptor"                  # projector outputs compressed by the adaptor; g = last row
OFFICIAL_LLAVA15 = "official-llava15"  # official ViSpec on LLaVA-1.5: <image> token
                                       # embeddings as text rows, no adaptor, g = 0
IMAGE_INPUTS = (ADAPTOR, OFFICIAL_LLAVA15)


def draft_spec(kind: str, *, hidden_size: int, kv_heads: int, head_dim: int, top_k: int,
               max_len: int, dtype: str = "float32") -> GraphSpec:
    """Embedding, fusion, decoder layer, LM head and top-k of drafter ``kind`` in one graph
    (the head and top-k on ``logit_rows`` only)."""
    if kind not in DRAFTER_TYPES:
        raise ValueError(f"unknown drafter type {kind!r}; expected one of {DRAFTER_TYPES}")
    rows = (1, NEW, hidden_size)
    dims = step_dims(max_len)
    kv_in, kv_out = kv_tensors(1, kv_heads, head_dim, dtype)
    extra = {"vispec": (TensorSpec(GLOBAL_FEATURE, dtype, rows),),
             "hivis": (TensorSpec(RESIDUAL_INDEX, "int64", (1,)),)}.get(kind, ())
    return GraphSpec(
        name=DRAFT,
        inputs=(TensorSpec(INPUT_IDS, "int64", (1, NEW)),
                TensorSpec(INPUTS_EMBEDS, dtype, rows),
                TensorSpec(FEATURES, dtype, rows),
                TensorSpec(POSITION_IDS, "int64", (1, NEW)),
                TensorSpec(ATTENTION_MASK, "bool", (1, 1, NEW, "past+new")),
                TensorSpec(LOGIT_ROWS, "int64", (ROWS,)),
                *kv_in, *extra),
        outputs=(TensorSpec(HIDDEN_STATES, dtype, rows),
                 TensorSpec(TOPK_LOGPROBS, "float32", (1, ROWS, top_k)),
                 TensorSpec(TOPK_IDS, "int64", (1, ROWS, top_k)),
                 *kv_out),
        dims=(*dims, Dim(ROWS, 1, dims[0].opt, dims[0].max)),
        meta={"kind": kind, "top_k": top_k, "kv_heads": kv_heads, "head_dim": head_dim},
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
