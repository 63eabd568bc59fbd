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

from moestream.engine.router import Gating, RouterConfig
from moestream.engine.yarn import YarnScaling
from moestream.kernels.errors import MoestreamError


class RopeStyle(Enum):
    NORM = "norm"  # rotate adjacent pairs (x[2i], x[2i+1]); llama-family GGUFs
    NEOX = "neox"  # rotate halves (x[i], x[i + n/2]); olmoe, qwen2moe, qwen3moe


class QKNorm(Enum):
    NONE = "none"
    FULL = "full"  # RMSNorm over the whole projection width (OLMoE)
    PER_HEAD = "per_head"  # RMSNorm over each head (Qwen3)
    PER_HEAD_IF_PRESENT = "per_head_if_present"  # per head where the file has them (GLM-4.5, not -Air)


@dataclass(frozen=True)
class ArchSpec:
    rope: RopeStyle
    qk_norm: QKNorm
    shared_expert: bool
    norm_topk_default: bool
    attn_bias: bool = False  # q/k/v biases (Qwen2): used when present in the file
    # Sliding-window attention on layers i with i % swa_pattern < swa_pattern - 1, over the
    # last {arch}.attention.sliding_window tokens (llama.cpp's set_swa_pattern); 0: none.
    swa_pattern: int = 0
    yarn_truncate: bool = True  # YaRN's correction range rounded outward (engine/yarn.py)
    gating_default: Gating = Gating.SOFTMAX  # router scores when expert_gating_func is absent
    ffn_norm: str = "ffn_norm"  # the pre-FFN norm's tensor name, blk.N.{ffn_norm}.weight


ARCHITECTURES: dict[str, ArchSpec] = {
    "olmoe": ArchSpec(RopeStyle.NEOX, QKNorm.FULL, shared_expert=False, norm_topk_default=False),
    "qwen2moe": ArchSpec(
        RopeStyle.NEOX, QKNorm.NONE, shared_expert=True, norm_topk_default=False, attn_bias=True
    ),
    "qwen3moe": ArchSpec(RopeStyle.NEOX, QKNorm.PER_HEAD, shared_expert=False, norm_topk_default=True),
    "llama": ArchSpec(RopeStyle.NORM, QKNorm.NONE, shared_expert=False, norm_topk_default=True),
    # Qwen3.5/3.6 MoE: Gated DeltaNet layers between gated full-attention layers
    # (LinearAttnConfig; the forward is engine/models/qwen35moe.py). The rope is interleaved
    # M-RoPE, which for text (one position per token in every section) is NEOX rope over
    # rope.dimension_count dims; the converter bakes the (1 + w) RMSNorm offset into the norms.
    "qwen35moe": ArchSpec(RopeStyle.NEOX, QKNorm.PER_HEAD, shared_expert=True, norm_topk_default=True),
    # gpt-oss: sliding-window layers (even) between full ones, attention sinks, biases
    # everywhere, YaRN without truncation, its own router and clamped SwiGLU experts
    # (engine/models/gptoss.py).
    "gpt-oss": ArchSpec(RopeStyle.NEOX, QKNorm.NONE, shared_expert=False, norm_topk_default=False,
                        attn_bias=True, swa_pattern=2, yarn_truncate=False),
    # GLM-4.5 / 4.5-Air: q/k/v biases, NEOX rope over rope.dimension_count (half of each
    # head), per-head q/k norms where the file has them (4.5, not -Air), leading dense
    # layers, an ungated shared expert, sigmoid routing with a correction bias (llama.cpp's
    # default when expert_gating_func is absent); the pre-FFN norm is post_attention_norm.
    "glm4moe": ArchSpec(RopeStyle.NEOX, QKNorm.PER_HEAD_IF_PRESENT, shared_expert=True, norm_topk_default=False,
                        attn_bias=True, gating_default=Gating.SIGMOID, ffn_norm="post_attention_norm"),
}


@dataclass(frozen=True)
class LinearAttnConfig:
    """The Gated DeltaNet layers of a hybrid model, from llama.cpp's `ssm.*` keys (the
    converter writes: conv_kernel = linear_conv_kernel_dim, state_size = linear_key_head_dim,
    group_count = linear_num_key_heads, time_step_rank = linear_num_value_heads,
    inner_size = linear_value_head_dim * linear_num_value_heads)."""

    conv_kernel: int
    head_k_dim: int
    n_k_heads: int
    n_v_heads: int
    head_v_dim: int
    recurrent_layers: tuple[bool, ...]  # attention.recurrent_layers: True for a DeltaNet layer

    def __post_init__(self) -> None:
        assert self.n_v_heads % self.n_k_heads == 0, "DeltaNet v-heads must be a multiple of k-heads"
        assert self.conv_kernel >= 2

    @property
    def conv_channels(self) -> int:
        """Width of attn_qkv's output, which the short convolution runs over: q, k, v."""
        return 2 * self.n_k_heads * self.head_k_dim + self.n_v_heads * self.head_v_dim

    @property
    def state_bytes_per_seq(self) -> int:
        """fp32 conv window and recurrent state of one sequence over every DeltaNet layer."""
        conv = (self.conv_kernel - 1) * self.conv_channels
        recurrent = self.n_v_heads * self.head_k_dim * self.head_v_dim
        return sum(self.recurrent_layers) * (conv + recurrent) * 4

    @classmethod
    def from_metadata(cls, keys: _MetadataKeys) -> LinearAttnConfig:
        n_layers = keys.count("block_count")
        if f"{keys.arch}.attention.recurrent_layers" in keys.meta:
            recurrent = keys.get("attention.recurrent_layers")
            keys.require(isinstance(recurrent, list) and len(recurrent) == n_layers,
                         "attention.recurrent_layers", recurrent, f"one flag per layer ({n_layers})")
            recurrent = tuple(bool(r) for r in recurrent)
        else:  # files without the list: every full_attention_interval-th layer is full attention
            interval = keys.count("full_attention_interval")
            recurrent = tuple((i + 1) % interval != 0 for i in range(n_layers))
        keys.require(not all(recurrent), "attention.recurrent_layers", recurrent, "not all True")
        n_k_heads, n_v_heads = keys.count("ssm.group_count"), keys.count("ssm.time_step_rank")
        keys.require(n_v_heads % n_k_heads == 0, "ssm.time_step_rank", n_v_heads,
                     f"a multiple of ssm.group_count ({n_k_heads})")
        inner = keys.count("ssm.inner_size")
        keys.require(inner % n_v_heads == 0, "ssm.inner_size", inner,
                     f"a multiple of ssm.time_step_rank ({n_v_heads})")
        return cls(conv_kernel=keys.count("ssm.conv_kernel", minimum=2),
                   head_k_dim=keys.count("ssm.state_size"), n_k_heads=n_k_heads, n_v_heads=n_v_heads,
                   head_v_dim=inner // n_v_heads, recurrent_layers=recurrent)


# Hybrid architectures: the ones with Gated DeltaNet layers described by LinearAttnConfig.
LINEAR_ATTN_ARCHS = ("qwen35moe",)


def linear_attn_config(meta: dict[str, Any], arch: str, source: str) -> LinearAttnConfig | None:
    """The DeltaNet layers of a hybrid architecture (None for the others), from `{arch}.*` keys."""
    if arch not in LINEAR_ATTN_ARCHS:
        return None
    return LinearAttnConfig.from_metadata(_MetadataKeys(meta, arch, source))


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
    router: RouterConfig
    spec: ArchSpec
    linear: LinearAttnConfig | None = None  # hybrid models only
    yarn: YarnScaling | None = None  # rope.scaling.type "yarn"
    sliding_window: int = 0  # tokens a sliding-window layer attends to (ArchSpec.swa_pattern)
    n_dense_layers: int = 0  # leading layers with a plain SwiGLU FFN instead of experts
    dense_ffn: int = 0  # their FFN width (feed_forward_length)
    n_nextn_layers: int = 0  # next-token-prediction blocks after the n_layers the forward runs

    def __post_init__(self) -> None:
        assert self.n_heads % self.n_kv_heads == 0, "heads must be a multiple of KV heads"
        assert 0 < self.n_experts_used <= self.n_experts
        assert self.rope_dims <= self.head_dim and self.rope_dims % 2 == 0
        assert 0 <= self.n_dense_layers < self.n_layers, "at least one layer must have experts"
        assert self.dense_ffn > 0 or self.n_dense_layers == 0

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
        expert_ffn = keys.count(ffn_name)
        shared_ffn = 0
        if spec.shared_expert:
            shared_ffn = _shared_ffn(keys, expert_ffn)
        n_nextn_layers = keys.count("nextn_predict_layers", 0, minimum=0)
        n_layers = keys.count("block_count") - n_nextn_layers
        keys.require(n_layers >= 1, "nextn_predict_layers", n_nextn_layers, "below block_count")
        n_dense_layers = keys.count("leading_dense_block_count", 0, minimum=0)
        keys.require(n_dense_layers < n_layers, "leading_dense_block_count", n_dense_layers,
                     f"below the layer count ({n_layers}): moestream runs Mixture-of-Experts models")
        dense_ffn = keys.count("feed_forward_length") if n_dense_layers else 0
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
        rope_scale, yarn = 1.0, None
        if scaling == "linear":
            rope_scale = 1.0 / keys.positive("rope.scaling.factor")
        elif scaling == "yarn":
            yarn = YarnScaling(factor=keys.positive("rope.scaling.factor"),
                               original_context=keys.count("rope.scaling.original_context_length"),
                               beta_fast=keys.positive("rope.scaling.yarn_beta_fast", 32.0),
                               beta_slow=keys.positive("rope.scaling.yarn_beta_slow", 1.0),
                               attn_factor=keys.positive("rope.scaling.attn_factor", 1.0),
                               truncate=spec.yarn_truncate)
        elif scaling not in ("none", None):
            raise MoestreamError(f"{source}: rope scaling {scaling!r} is not supported yet")
        return cls(
            arch=arch,
            name=str(meta.get("general.name", arch)),
            n_layers=n_layers,
            d_model=d_model,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=head_dim,
            n_experts=n_experts,
            n_experts_used=n_experts_used,
            expert_ffn=expert_ffn,
            shared_ffn=shared_ffn,
            vocab_size=vocab_size,
            context_length=keys.count("context_length", 4096),
            rms_eps=rms_eps,
            rope_base=keys.positive("rope.freq_base", 10000.0),
            rope_dims=rope_dims,
            rope_scale=rope_scale,
            router=_router_config(keys, spec, n_experts, n_experts_used),
            spec=spec,
            linear=linear_attn_config(meta, arch, source),
            yarn=yarn,
            sliding_window=keys.count("attention.sliding_window") if spec.swa_pattern else 0,
            n_dense_layers=n_dense_layers,
            dense_ffn=dense_ffn,
            n_nextn_layers=n_nextn_layers,
        )

    @property
    def attention_layers(self) -> tuple[int, ...]:
        """The layers with softmax attention over a KV cache (all but the DeltaNet ones)."""
        if self.linear is None:
            return tuple(range(self.n_layers))
        return tuple(i for i, r in enumerate(self.linear.recurrent_layers) if not r)

    def is_sliding(self, layer: int) -> bool:
        """Whether `layer` attends to the last `sliding_window` tokens only."""
        pattern = self.spec.swa_pattern
        return pattern > 0 and layer % pattern < pattern - 1

    @property
    def moe_layers(self) -> range:
        """The layers with routed experts (the leading dense ones have none)."""
        return range(self.n_dense_layers, self.n_layers)

    @property
    def n_kv_layers(self) -> int:
        """Layers the KV cache holds: hybrid models keep no K/V for their DeltaNet layers."""
        return len(self.attention_layers)


def _shared_ffn(keys: _MetadataKeys, expert_ffn: int) -> int:
    """The shared expert's width as llama.cpp reads it: expert_shared_feed_forward_length
    (qwen2moe, qwen35moe), else expert_shared_count experts of the routed width (deepseek2,
    glm4moe), else feed_forward_length."""
    if keys.meta.get(f"{keys.arch}.expert_shared_feed_forward_length"):
        return keys.count("expert_shared_feed_forward_length")
    if f"{keys.arch}.expert_shared_count" in keys.meta:
        return keys.count("expert_shared_count") * expert_ffn
    return keys.count("feed_forward_length")


def _router_config(keys: _MetadataKeys, spec: ArchSpec, n_experts: int, n_experts_used: int) -> RouterConfig:
    gating_id = keys.count("expert_gating_func", 0, minimum=0)
    gatings = {g.value: g for g in Gating}
    keys.require(gating_id == 0 or gating_id in gatings, "expert_gating_func", gating_id,
                 "1 (softmax) or 2 (sigmoid); other gating functions are not supported yet")
    n_groups = keys.count("expert_group_count", 1, minimum=0) or 1
    keys.require(n_experts % n_groups == 0, "expert_group_count", n_groups,
                 f"a divisor of expert_count ({n_experts})")
    n_groups_used = keys.count("expert_group_used_count", n_groups, minimum=0) if n_groups > 1 else 1
    keys.require(1 <= n_groups_used <= n_groups, "expert_group_used_count", n_groups_used,
                 f"between 1 and expert_group_count ({n_groups})")
    keys.require(n_groups_used * (n_experts // n_groups) >= n_experts_used, "expert_group_used_count",
                 n_groups_used, f"groups holding at least expert_used_count ({n_experts_used}) experts")
    scale = keys.positive("expert_weights_scale", 1.0)
    return RouterConfig(
        gating=gatings.get(gating_id, spec.gating_default),
        n_experts_used=n_experts_used,
        norm_topk=bool(keys.meta.get(f"{keys.arch}.expert_weights_norm", spec.norm_topk_default)),
        weights_scale=scale,
        n_groups=n_groups,
        n_groups_used=n_groups_used,
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
