"""A drafter's architecture, read from the official ``config.json`` plus two weight shapes."""
from __future__ import annotations

from dataclasses import dataclass

from transformers import LlamaConfig

from vispec.runtime.drafter_specs import DRAFTER_TYPES
from vispec.runtime.errors import ModelDirError


@dataclass(frozen=True)
class DrafterConfig:
    """One-layer drafter of ``kind``; ``num_q`` (ViSpec) and ``residual_rows`` (HiViS) come
    from the shapes of ``imadpt.q`` and ``residual``, not from config.json."""

    kind: str
    hidden_size: int
    intermediate_size: int
    num_heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    qkv_bias: bool
    fc_bias: bool
    hidden_act: str = "silu"
    num_q: int = 0
    residual_rows: int = 0

    def __post_init__(self):
        if self.kind not in DRAFTER_TYPES:
            raise ValueError(f"drafter kind {self.kind!r} not in {DRAFTER_TYPES}")
        if self.kind == "vispec" and self.num_q < 2:
            raise ModelDirError(f"ViSpec drafter needs num_q >= 2 adaptor queries, got "
                                f"{self.num_q}. Hint: imadpt.q must be [num_q, heads, head_dim]")
        if self.kind == "hivis" and self.residual_rows < 1:
            raise ModelDirError("HiViS drafter has an empty `residual` table")
        scaling = self.rope_scaling or {}
        if (scaling.get("rope_type") or scaling.get("type")) == "dynamic":
            raise ModelDirError("drafter rope_scaling type 'dynamic' depends on the sequence "
                                "length at run time and cannot be exported. Hint: use a "
                                "static scaling (linear) or none")

    @classmethod
    def from_json(cls, d: dict, kind: str, num_q: int = 0, residual_rows: int = 0):
        """From an official config.json dict (Llama/Qwen2 field names)."""
        heads = int(d["num_attention_heads"])
        return cls(kind=kind, hidden_size=int(d["hidden_size"]),
                   intermediate_size=int(d["intermediate_size"]), num_heads=heads,
                   kv_heads=int(d.get("num_key_value_heads") or heads),
                   head_dim=int(d.get("head_dim") or int(d["hidden_size"]) // heads),
                   vocab_size=int(d["vocab_size"]),
                   rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                   rope_theta=float(d.get("rope_theta") or 10000.0),
                   rope_scaling=d.get("rope_scaling"),
                   max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
                   qkv_bias=bool(d.get("qkv_bias", False)), fc_bias=bool(d.get("bias", True)),
                   hidden_act=d.get("hidden_act", "silu"), num_q=num_q,
                   residual_rows=residual_rows)

    def to_json(self) -> dict:
        """The official config.json fields (num_q / residual rows live in the weights)."""
        d = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
             "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
             "num_attention_heads": self.num_heads, "num_key_value_heads": self.kv_heads,
             "head_dim": self.head_dim, "vocab_size": self.vocab_size,
             "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
             "rope_scaling": self.rope_scaling,
             "max_position_embeddings": self.max_position_embeddings,
             "hidden_act": self.hidden_act, "num_hidden_layers": 1, "bias": self.fc_bias}
        if self.qkv_bias:
            d["qkv_bias"] = True
        return d

    def llama_config(self) -> LlamaConfig:
        """A LlamaConfig for the transformers modules reused here (rotary, MLP, RMSNorm)."""
        return LlamaConfig(hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                           num_attention_heads=self.num_heads, num_key_value_heads=self.kv_heads,
                           head_dim=self.head_dim, vocab_size=self.vocab_size,
                           rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta,
                           rope_scaling=self.rope_scaling, hidden_act=self.hidden_act,
                           max_position_embeddings=self.max_position_embeddings, mlp_bias=False)
