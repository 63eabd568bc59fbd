"""One frozen ModelConfig per model, built once from GGUF metadata.

Architectures come from one explicit table keyed on `general.architecture`; each entry
states what llama.cpp does for that architecture (rope style, q/k norm, shared expert,
whether top-k routing weights are renormalised) so the forward never branches on names.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from moestream.kernels.errors import MoestreamError


class RopeStyle(Enum):
    NORM = "norm"  # rotate adjacent pairs (x[2i], x[2i+1]); llama-family GGUFs
    NEOX = "neox"  # rotate halves (x[i], x[i + n/2]); olmoe, qwen2moe, qwen3moe


class QKNorm(Enum):
    NONE = "none"
    FULL = "full"  # RMSNorm over the whole projection width (OLMoE)
    PER_HEAD = "per_head"  # RMSNorm over each head (Qwen3)


@dataclass(frozen=True)
class ArchSpec:
    rope: RopeStyle
    qk_norm: QKNorm
    shared_expert: bool
    norm_topk_default: bool
    attn_bias: bool = False  # q/k/v biases (Qwen2): used when present in the file


ARCHITECTURES: dict[str, ArchSpec] = {
    "olmoe": ArchSpec(RopeStyle.NEOX, QKNorm.FULL, shared_expert=False, norm_topk_default=False),
    "qwen2moe": ArchSpec(
        RopeStyle.NEOX, QKNorm.NONE, shared_expert=True, norm_topk_default=False, attn_bias=True
    ),
    "qwen3moe": ArchSpec(RopeStyle.NEOX, QKNorm.PER_HEAD, shared_expert=False, norm_topk_default=True),
    "llama": ArchSpec(RopeStyle.NORM, QKNorm.NONE, shared_expert=False, norm_topk_default=True),
}


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    name: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_experts: int
    n_experts_used: int
    expert_ffn: int
    shared_ffn: int
    vocab_size: int
    context_length: int
    rms_eps: float
    rope_base: float
    rope_dims: int
    rope_scale: float
    norm_topk: bool
    spec: ArchSpec

    def __post_init__(self) -> None:
        assert self.n_heads % self.n_kv_heads == 0, "heads must be a multiple of KV heads"
        assert 0 < self.n_experts_used <= self.n_experts
        assert self.rope_dims <= self.head_dim and self.rope_dims % 2 == 0

    @classmethod
    def from_metadata(cls, meta: dict[str, Any], vocab_size: int, source: str) -> ModelConfig:
        arch = meta.get("general.architecture")
        if arch not in ARCHITECTURES:
            raise MoestreamError(
                f"{source}: architecture {arch!r} is not supported; moestream serves "
                f"{', '.join(sorted(ARCHITECTURES))} (Mixtral files say 'llama')"
            )
        spec = ARCHITECTURES[arch]

        def key(name: str, default: Any = None) -> Any:
            value = meta.get(f"{arch}.{name}", default)
            if value is None:
                raise MoestreamError(f"{source}: metadata key {arch}.{name} is missing; "
                                     "re-convert the model with a recent llama.cpp")
            return value

        n_experts = int(key("expert_count", 0))
        if n_experts == 0:
            raise MoestreamError(f"{source}: {arch} model without experts ({arch}.expert_count); "
                                 "moestream serves Mixture-of-Experts models only")
        d_model = int(key("embedding_length"))
        n_heads = int(key("attention.head_count"))
        head_dim = int(meta.get(f"{arch}.attention.key_length", d_model // n_heads))
        ffn = meta.get(f"{arch}.expert_feed_forward_length") or key("feed_forward_length")
        scaling = meta.get(f"{arch}.rope.scaling.type", "none")
        rope_scale = 1.0
        if scaling == "linear":
            rope_scale = 1.0 / float(key("rope.scaling.factor"))
        elif scaling not in ("none", None):
            raise MoestreamError(f"{source}: rope scaling {scaling!r} is not supported yet")
        return cls(
            arch=arch,
            name=str(meta.get("general.name", arch)),
            n_layers=int(key("block_count")),
            d_model=d_model,
            n_heads=n_heads,
            n_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv", n_heads)),
            head_dim=head_dim,
            n_experts=n_experts,
            n_experts_used=int(key("expert_used_count")),
            expert_ffn=int(ffn),
            shared_ffn=int(meta.get(f"{arch}.expert_shared_feed_forward_length", 0)),
            vocab_size=vocab_size,
            context_length=int(key("context_length", 4096)),
            rms_eps=float(key("attention.layer_norm_rms_epsilon")),
            rope_base=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
            rope_dims=int(meta.get(f"{arch}.rope.dimension_count", head_dim)),
            rope_scale=rope_scale,
            norm_topk=bool(meta.get(f"{arch}.expert_weights_norm", spec.norm_topk_default)),
            spec=spec,
        )
