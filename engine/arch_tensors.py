"""The tensors the forward reads, and the shape the metadata gives each, as one table.

Names are llama.cpp's; shapes are in torch order (slowest first, e.g. experts
[n_expert, rows, cols]). Each dimension names the metadata key it comes from, so a file
whose header disagrees with itself is refused with the key to blame.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

from moestream.engine.config import ModelConfig, QKNorm
from moestream.engine.router import Gating


@dataclass(frozen=True)
class Dim:
    """One tensor dimension fixed by the metadata."""

    key: str  # the metadata it comes from ("{arch}." is filled in)
    size: Callable[[ModelConfig], int]


D_MODEL = Dim("{arch}.embedding_length", lambda c: c.d_model)
VOCAB = Dim("the token count of tokenizer.ggml.tokens", lambda c: c.vocab_size)
Q_WIDTH = Dim("{arch}.attention.head_count x key_length", lambda c: c.n_heads * c.head_dim)
KV_WIDTH = Dim("{arch}.attention.head_count_kv x key_length", lambda c: c.n_kv_heads * c.head_dim)
HEAD_DIM = Dim("{arch}.attention.key_length", lambda c: c.head_dim)
N_EXPERTS = Dim("{arch}.expert_count", lambda c: c.n_experts)
EXPERT_FFN = Dim("{arch}.expert_feed_forward_length (or feed_forward_length)", lambda c: c.expert_ffn)
DENSE_FFN = Dim("{arch}.feed_forward_length", lambda c: c.dense_ffn)
TWO_D_MODEL = Dim("2 x {arch}.embedding_length", lambda c: 2 * c.d_model)
SHARED_FFN = Dim("{arch}.expert_shared_feed_forward_length (or expert_shared_count x "
                 "expert_feed_forward_length, or feed_forward_length)",
                 lambda c: c.shared_ffn)
# hybrid models' Gated DeltaNet layers (LinearAttnConfig)
Q_GATE_WIDTH = Dim("2 x {arch}.attention.head_count x key_length", lambda c: 2 * c.n_heads * c.head_dim)
CONV_CHANNELS = Dim("2 x {arch}.ssm.group_count x state_size + ssm.inner_size",
                    lambda c: c.linear.conv_channels)
CONV_KERNEL = Dim("{arch}.ssm.conv_kernel", lambda c: c.linear.conv_kernel)
SSM_INNER = Dim("{arch}.ssm.inner_size", lambda c: c.linear.n_v_heads * c.linear.head_v_dim)
V_HEADS = Dim("{arch}.ssm.time_step_rank", lambda c: c.linear.n_v_heads)
V_HEAD_DIM = Dim("{arch}.ssm.inner_size / time_step_rank", lambda c: c.linear.head_v_dim)
N_HEADS = Dim("{arch}.attention.head_count", lambda c: c.n_heads)


def _always(config: ModelConfig) -> bool:
    return True


def _full_qk_norm(config: ModelConfig) -> bool:
    return config.spec.qk_norm is QKNorm.FULL


def _per_head_qk_norm(config: ModelConfig) -> bool:
    return config.spec.qk_norm is QKNorm.PER_HEAD


def _per_head_qk_norm_if_present(config: ModelConfig) -> bool:
    return config.spec.qk_norm is QKNorm.PER_HEAD_IF_PRESENT


def _shared_expert(config: ModelConfig) -> bool:
    return config.spec.shared_expert


def _sigmoid_router(config: ModelConfig) -> bool:
    return config.router.gating is Gating.SIGMOID


@dataclass(frozen=True)
class TensorRule:
    name: str  # "{i}" stands for the layer index, "{ffn_norm}" for ArchSpec.ffn_norm
    dims: tuple[Dim, ...]
    is_required: bool = True
    applies: Callable[[ModelConfig], bool] = _always


MODEL_TENSORS = (
    TensorRule("token_embd.weight", (VOCAB, D_MODEL)),
    TensorRule("output_norm.weight", (D_MODEL,)),
    TensorRule("output.weight", (VOCAB, D_MODEL), is_required=False),  # else tied to token_embd
)

ATTENTION_TENSORS = (
    TensorRule("blk.{i}.attn_norm.weight", (D_MODEL,)),
    TensorRule("blk.{i}.attn_q.weight", (Q_WIDTH, D_MODEL)),
    TensorRule("blk.{i}.attn_k.weight", (KV_WIDTH, D_MODEL)),
    TensorRule("blk.{i}.attn_v.weight", (KV_WIDTH, D_MODEL)),
    TensorRule("blk.{i}.attn_output.weight", (D_MODEL, Q_WIDTH)),
    # biases are used wherever a file has them (Qwen2 and GLM-4.5 always do)
    TensorRule("blk.{i}.attn_q.bias", (Q_WIDTH,), is_required=False),
    TensorRule("blk.{i}.attn_k.bias", (KV_WIDTH,), is_required=False),
    TensorRule("blk.{i}.attn_v.bias", (KV_WIDTH,), is_required=False),
    TensorRule("blk.{i}.attn_q_norm.weight", (Q_WIDTH,), applies=_full_qk_norm),
    TensorRule("blk.{i}.attn_k_norm.weight", (KV_WIDTH,), applies=_full_qk_norm),
    TensorRule("blk.{i}.attn_q_norm.weight", (HEAD_DIM,), applies=_per_head_qk_norm),
    TensorRule("blk.{i}.attn_k_norm.weight", (HEAD_DIM,), applies=_per_head_qk_norm),
    TensorRule("blk.{i}.attn_q_norm.weight", (HEAD_DIM,), is_required=False, applies=_per_head_qk_norm_if_present),
    TensorRule("blk.{i}.attn_k_norm.weight", (HEAD_DIM,), is_required=False, applies=_per_head_qk_norm_if_present),
    TensorRule("blk.{i}.{ffn_norm}.weight", (D_MODEL,)),
)
MOE_TENSORS = (
    TensorRule("blk.{i}.ffn_gate_inp.weight", (N_EXPERTS, D_MODEL)),
    # the correction bias of sigmoid routers (DeepSeek-V3 style), for choosing experts only
    TensorRule("blk.{i}.exp_probs_b.bias", (N_EXPERTS,), is_required=False, applies=_sigmoid_router),
    TensorRule("blk.{i}.ffn_gate_exps.weight", (N_EXPERTS, EXPERT_FFN, D_MODEL)),
    TensorRule("blk.{i}.ffn_up_exps.weight", (N_EXPERTS, EXPERT_FFN, D_MODEL)),
    TensorRule("blk.{i}.ffn_down_exps.weight", (N_EXPERTS, D_MODEL, EXPERT_FFN)),
    TensorRule("blk.{i}.ffn_gate_shexp.weight", (SHARED_FFN, D_MODEL), applies=_shared_expert),
    TensorRule("blk.{i}.ffn_up_shexp.weight", (SHARED_FFN, D_MODEL), applies=_shared_expert),
    TensorRule("blk.{i}.ffn_down_shexp.weight", (D_MODEL, SHARED_FFN), applies=_shared_expert),
    TensorRule("blk.{i}.ffn_gate_inp_shexp.weight", (D_MODEL,), is_required=False, applies=_shared_expert),
)
LAYER_TENSORS = ATTENTION_TENSORS + MOE_TENSORS
# the leading dense layers (leading_dense_block_count): a plain SwiGLU FFN, no experts
DENSE_LAYER_TENSORS = ATTENTION_TENSORS + (
    TensorRule("blk.{i}.ffn_gate.weight", (DENSE_FFN, D_MODEL)),
    TensorRule("blk.{i}.ffn_up.weight", (DENSE_FFN, D_MODEL)),
    TensorRule("blk.{i}.ffn_down.weight", (D_MODEL, DENSE_FFN)),
)
# A next-token-prediction (MTP) block after the last layer (nextn_predict_layers): a whole
# layer plus these; the forward never reads them, so they are checked but not required.
NEXTN_TENSORS = (
    TensorRule("blk.{i}.nextn.eh_proj.weight", (D_MODEL, TWO_D_MODEL)),
    TensorRule("blk.{i}.nextn.enorm.weight", (D_MODEL,)),
    TensorRule("blk.{i}.nextn.hnorm.weight", (D_MODEL,)),
    TensorRule("blk.{i}.nextn.embed_tokens.weight", (VOCAB, D_MODEL)),
    TensorRule("blk.{i}.nextn.shared_head_head.weight", (VOCAB, D_MODEL)),
    TensorRule("blk.{i}.nextn.shared_head_norm.weight", (D_MODEL,)),
)


# qwen35moe as llama.cpp's converter writes it (read off converted files with GGUFReader):
# every layer has attn_norm, post_attention_norm (the pre-FFN norm), the routed experts and a
# sigmoid-gated shared expert; a DeltaNet layer has attn_qkv (q, k, v for the convolution),
# attn_gate (z), ssm_conv1d, ssm_dt.bias, ssm_a (already -exp(A_log), no .weight suffix),
# ssm_alpha, ssm_beta, ssm_norm (per v-head), ssm_out; a full-attention layer has attn_q (per
# head: query then gate), attn_k, attn_v, per-head q/k norms, attn_output. Norm weights
# already carry the +1 of HF's (1 + w) norms. V-heads are tiled over k-heads.
HYBRID_LAYER_TENSORS = (
    TensorRule("blk.{i}.attn_norm.weight", (D_MODEL,)),
    TensorRule("blk.{i}.post_attention_norm.weight", (D_MODEL,)),
    TensorRule("blk.{i}.ffn_gate_inp.weight", (N_EXPERTS, D_MODEL)),
    TensorRule("blk.{i}.ffn_gate_exps.weight", (N_EXPERTS, EXPERT_FFN, D_MODEL)),
    TensorRule("blk.{i}.ffn_up_exps.weight", (N_EXPERTS, EXPERT_FFN, D_MODEL)),
    TensorRule("blk.{i}.ffn_down_exps.weight", (N_EXPERTS, D_MODEL, EXPERT_FFN)),
    TensorRule("blk.{i}.ffn_gate_shexp.weight", (SHARED_FFN, D_MODEL)),
    TensorRule("blk.{i}.ffn_up_shexp.weight", (SHARED_FFN, D_MODEL)),
    TensorRule("blk.{i}.ffn_down_shexp.weight", (D_MODEL, SHARED_FFN)),
    TensorRule("blk.{i}.ffn_gate_inp_shexp.weight", (D_MODEL,)),
)
DELTANET_TENSORS = (
    TensorRule("blk.{i}.attn_qkv.weight", (CONV_CHANNELS, D_MODEL)),
    TensorRule("blk.{i}.attn_gate.weight", (SSM_INNER, D_MODEL)),
    TensorRule("blk.{i}.ssm_conv1d.weight", (CONV_CHANNELS, CONV_KERNEL)),
    TensorRule("blk.{i}.ssm_dt.bias", (V_HEADS,)),
    TensorRule("blk.{i}.ssm_a", (V_HEADS,)),
    TensorRule("blk.{i}.ssm_alpha.weight", (V_HEADS, D_MODEL)),
    TensorRule("blk.{i}.ssm_beta.weight", (V_HEADS, D_MODEL)),
    TensorRule("blk.{i}.ssm_norm.weight", (V_HEAD_DIM,)),
    TensorRule("blk.{i}.ssm_out.weight", (D_MODEL, SSM_INNER)),
)
GATED_ATTENTION_TENSORS = (
    TensorRule("blk.{i}.attn_q.weight", (Q_GATE_WIDTH, D_MODEL)),
    TensorRule("blk.{i}.attn_k.weight", (KV_WIDTH, D_MODEL)),
    TensorRule("blk.{i}.attn_v.weight", (KV_WIDTH, D_MODEL)),
    TensorRule("blk.{i}.attn_q_norm.weight", (HEAD_DIM,)),
    TensorRule("blk.{i}.attn_k_norm.weight", (HEAD_DIM,)),
    TensorRule("blk.{i}.attn_output.weight", (D_MODEL, Q_WIDTH)),
)


# gpt-oss as llama.cpp's converter writes it: biases on q/k/v/o, the router and every expert
# projection ([n_expert, rows]), one learned sink logit per head, post_attention_norm as the
# pre-FFN norm.
GPTOSS_LAYER_TENSORS = (
    TensorRule("blk.{i}.attn_norm.weight", (D_MODEL,)),
    TensorRule("blk.{i}.attn_q.weight", (Q_WIDTH, D_MODEL)),
    TensorRule("blk.{i}.attn_k.weight", (KV_WIDTH, D_MODEL)),
    TensorRule("blk.{i}.attn_v.weight", (KV_WIDTH, D_MODEL)),
    TensorRule("blk.{i}.attn_output.weight", (D_MODEL, Q_WIDTH)),
    TensorRule("blk.{i}.attn_q.bias", (Q_WIDTH,)),
    TensorRule("blk.{i}.attn_k.bias", (KV_WIDTH,)),
    TensorRule("blk.{i}.attn_v.bias", (KV_WIDTH,)),
    TensorRule("blk.{i}.attn_output.bias", (D_MODEL,)),
    TensorRule("blk.{i}.attn_sinks.weight", (N_HEADS,)),
    TensorRule("blk.{i}.post_attention_norm.weight", (D_MODEL,)),
    TensorRule("blk.{i}.ffn_gate_inp.weight", (N_EXPERTS, D_MODEL)),
    TensorRule("blk.{i}.ffn_gate_inp.bias", (N_EXPERTS,)),
    TensorRule("blk.{i}.ffn_gate_exps.weight", (N_EXPERTS, EXPERT_FFN, D_MODEL)),
    TensorRule("blk.{i}.ffn_up_exps.weight", (N_EXPERTS, EXPERT_FFN, D_MODEL)),
    TensorRule("blk.{i}.ffn_down_exps.weight", (N_EXPERTS, D_MODEL, EXPERT_FFN)),
    TensorRule("blk.{i}.ffn_gate_exps.bias", (N_EXPERTS, EXPERT_FFN)),
    TensorRule("blk.{i}.ffn_up_exps.bias", (N_EXPERTS, EXPERT_FFN)),
    TensorRule("blk.{i}.ffn_down_exps.bias", (N_EXPERTS, D_MODEL)),
)
FAMILY_LAYER_TENSORS: dict[str, tuple[TensorRule, ...]] = {"gpt-oss": GPTOSS_LAYER_TENSORS}


def layer_rules(config: ModelConfig, i: int) -> tuple[TensorRule, ...]:
    if i >= config.n_layers:  # a next-token-prediction block
        rules = layer_rules(config, config.n_layers - 1) + NEXTN_TENSORS
        return tuple(replace(rule, is_required=False) for rule in rules)
    if config.arch in FAMILY_LAYER_TENSORS:
        return FAMILY_LAYER_TENSORS[config.arch]
    if config.linear is None:
        return DENSE_LAYER_TENSORS if i < config.n_dense_layers else LAYER_TENSORS
    mixer = DELTANET_TENSORS if config.linear.recurrent_layers[i] else GATED_ATTENTION_TENSORS
    return HYBRID_LAYER_TENSORS + mixer


@dataclass(frozen=True)
class ExpectedTensor:
    name: str
    shape: tuple[int, ...]
    keys: tuple[str, ...]  # the metadata behind each dimension
    is_required: bool


def expected_tensors(config: ModelConfig) -> Iterator[ExpectedTensor]:
    """Every tensor a model of this config may have, with the shape its metadata gives it."""
    def expect(rule: TensorRule, name: str) -> ExpectedTensor:
        return ExpectedTensor(name, tuple(d.size(config) for d in rule.dims),
                              tuple(d.key.format(arch=config.arch) for d in rule.dims), rule.is_required)

    for rule in MODEL_TENSORS:
        if rule.applies(config):
            yield expect(rule, rule.name)
    for i in range(config.n_layers + config.n_nextn_layers):
        for rule in layer_rules(config, i):
            if rule.applies(config):
                yield expect(rule, rule.name.format(i=i, ffn_norm=config.spec.ffn_norm))
