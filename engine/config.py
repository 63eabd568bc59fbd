"""One frozen ModelConfig per model, built once from GGUF metadata.

Architectures come from one explicit table keyed on `general.architecture`; each entry
states what llama.cpp does for that architecture (rope style, q/k norm, shared expert,
whether top-k routing weights are renormalised) so the forward never branches on names.
"""

from __future__ import annotations

import math
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

    @property
    def kv_bytes_per_token(self) -> int:
        """fp32 K and V for every layer (the CPU cache dtype)."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * 4

    @classmethod
    def from_metadata(cls, meta: dict[str, Any], vocab_size: int, source: str) -> ModelConfig:
        arch = meta.get("general.architecture")
        if arch not in ARCHITECTURES:
            raise MoestreamError(
                f"{source}: architecture {arch!r} is not supported; moestream serves "
                f"{', '.join(sorted(ARCHITECTURES))} (Mixtral files say 'llama')"
            )
        spec = ARCHITECTURES[arch]
        keys = _MetadataKeys(meta, arch, source)
        if not meta.get(f"{arch}.expert_count"):
            raise MoestreamError(f"{source}: {arch} model without experts ({arch}.expert_count); "
                                 "moestream serves Mixture-of-Experts models only")
        n_experts = keys.count("expert_count")
        d_model = keys.count("embedding_length")
        n_heads = keys.count("attention.head_count")
        n_kv_heads = keys.count("attention.head_count_kv", n_heads)
        head_dim = keys.count("attention.key_length", d_model // n_heads)
        ffn_name = "expert_feed_forward_length" if meta.get(f"{arch}.expert_feed_forward_length") \
            else "feed_forward_length"
        shared_ffn = 0
        if spec.shared_expert:  # llama.cpp's default width for it: feed_forward_length
            shared_name = "expert_shared_feed_forward_length" \
                if meta.get(f"{arch}.expert_shared_feed_forward_length") else "feed_forward_length"
            shared_ffn = keys.count(shared_name)
        keys.require(n_heads % n_kv_heads == 0, "attention.head_count_kv", n_kv_heads,
                     f"a divisor of attention.head_count ({n_heads})")
        keys.require(keys.count("attention.value_length", head_dim) == head_dim, "attention.value_length",
                     meta.get(f"{arch}.attention.value_length"), f"attention.key_length ({head_dim})")
        n_experts_used = keys.count("expert_used_count")
        keys.require(n_experts_used <= n_experts, "expert_used_count", n_experts_used,
                     f"at most expert_count ({n_experts})")
        rope_dims = keys.count("rope.dimension_count", head_dim)
        keys.require(rope_dims <= head_dim and rope_dims % 2 == 0, "rope.dimension_count", rope_dims,
                     f"even and at most the head size ({head_dim})")
        rms_eps = keys.positive("attention.layer_norm_rms_epsilon")
        keys.require(rms_eps < 1, "attention.layer_norm_rms_epsilon", rms_eps, "below 1")
        scaling = meta.get(f"{arch}.rope.scaling.type", "none")
        rope_scale = 1.0
        if scaling == "linear":
            rope_scale = 1.0 / keys.positive("rope.scaling.factor")
        elif scaling not in ("none", None):
            raise MoestreamError(f"{source}: rope scaling {scaling!r} is not supported yet")
        return cls(
            arch=arch,
            name=str(meta.get("general.name", arch)),
            n_layers=keys.count("block_count"),
            d_model=d_model,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=head_dim,
            n_experts=n_experts,
            n_experts_used=n_experts_used,
            expert_ffn=keys.count(ffn_name),
            shared_ffn=shared_ffn,
            vocab_size=vocab_size,
            context_length=keys.count("context_length", 4096),
            rms_eps=rms_eps,
            rope_base=keys.positive("rope.freq_base", 10000.0),
            rope_dims=rope_dims,
            rope_scale=rope_scale,
            norm_topk=bool(meta.get(f"{arch}.expert_weights_norm", spec.norm_topk_default)),
            spec=spec,
        )


class _MetadataKeys:
    """`{arch}.*` values, each checked for its type and range: a corrupt header or a bad
    conversion becomes one error naming the key, never an exception from deeper down."""

    def __init__(self, meta: dict[str, Any], arch: str, source: str):
        self.meta, self.arch, self.source = meta, arch, source

    def get(self, name: str, default: Any = None) -> Any:
        value = self.meta.get(f"{self.arch}.{name}", default)
        if value is None:
            raise MoestreamError(f"{self.source}: metadata key {self.arch}.{name} is missing; "
                                 "re-convert the model with a recent llama.cpp")
        return value

    def count(self, name: str, default: int | None = None, minimum: int = 1) -> int:
        value = self.get(name, default)
        is_int = isinstance(value, int) and not isinstance(value, bool)
        self.require(is_int and value >= minimum, name, value, f"an integer of at least {minimum}")
        return value

    def positive(self, name: str, default: float | None = None) -> float:
        value = self.get(name, default)
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        self.require(is_number and math.isfinite(value) and value > 0, name, value, "a positive number")
        return float(value)

    def require(self, is_ok: bool, name: str, value: Any, expected: str) -> None:
        if not is_ok:
            raise MoestreamError(f"{self.source}: metadata {self.arch}.{name} = {value!r} must be "
                                 f"{expected}; the file is corrupt or was converted wrongly: "
                                 "download or re-convert it")
