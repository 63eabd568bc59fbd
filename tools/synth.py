"""Synthetic full-size MoE models: random weights, the exact shapes and quant mix of a real one.

`moestream synth --preset olmoe-1b-7b --quant Q4_K_M -o model.gguf` writes what
llama.cpp's converter + `llama-quantize ... Q4_K_M` would make of OLMoE-1B-7B, with random
blocks instead of trained weights: the right tensor names, shapes and per-tensor types
(tools.quant_mix), the architecture's metadata, and a byte-level BPE vocab of the right size
(not the model's real tokenizer). Benchmarks need the bytes and the routing work, not the
knowledge, so a multi-GB model can be made without a download.

Weights are streamed to disk in chunks (bounded RAM). Quantized blocks have random quant bits
(numpy's bulk random bytes) and random finite fp16 scales rescaled so that a dequantized weight has a standard deviation
of about 1/sqrt(row length): activations keep their size through the layers and logits stay
finite in fp16 (random bytes as scales would overflow).
"""

from __future__ import annotations

import argparse
import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q
from tqdm import tqdm

from moestream.engine.config import ARCHITECTURES
from moestream.tools.gguf_write import (CHATML_TEMPLATE, HARMONY_CONTROL_TOKENS, HARMONY_TEMPLATE, BpeVocab,
                                        add_tokenizer, byte_level_bpe_vocab)
from moestream.tools.quant_mix import FILE_TYPES, ModelFacts, TensorShape, file_type, tensor_types
from moestream.kernels.errors import MoestreamError
from moestream.kernels.formats import block_format

CHUNK_BYTES = 32 << 20  # generate and write at most this much of a tensor at once


@dataclass(frozen=True)
class MLA:
    """DeepSeek-V2 multi-head latent attention, as llama.cpp's converter lays it out."""

    kv_lora_rank: int
    q_lora_rank: int  # 0: one attn_q projection (V2-Lite)
    qk_nope_dim: int
    qk_rope_dim: int
    v_head_dim: int
    n_dense_lead: int  # leading layers with a dense FFN of width n_ff
    n_shared_experts: int  # shared expert width = n_shared_experts * n_ff_exp
    yarn: tuple[float, int, float] | None = None  # (factor, original context, mscale_all_dim)


@dataclass(frozen=True)
class GlmMoe:
    """GLM-4.5's layout as llama.cpp's converter writes it: leading dense layers, an ungated
    shared expert, sigmoid routing with a correction bias (exp_probs_b), NEOX rope on part of
    each head, post_attention_norm before the FFN, and NextN blocks after the last layer
    (counted in block_count, as the converter does unless told --no-mtp)."""

    n_dense_lead: int
    n_shared_experts: int  # shared expert width = n_shared_experts * n_ff_exp
    rope_dims: int
    weights_scale: float  # routed_scaling_factor
    n_nextn: int = 1


@dataclass(frozen=True)
class Preset:
    """A model's config.json facts, in GGUF terms."""

    arch: str  # general.architecture
    model: str  # general.name
    n_layers: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int
    n_ctx: int
    n_expert: int
    n_expert_used: int
    n_ff: int  # feed_forward_length (the expert width for olmoe and Mixtral)
    n_ff_exp: int | None  # expert_feed_forward_length where the file has one
    rope_base: float
    rms_eps: float
    n_ff_shexp: int = 0  # qwen2moe shared expert (with its own sigmoid gate)
    qk_norm: str = "none"  # "full" (OLMoE: over all heads), "per_head" (Qwen3)
    qkv_bias: bool = False
    mla: MLA | None = None
    sliding_window: int = 0  # gpt-oss: attention.sliding_window of its sliding layers
    # gpt-oss: YaRN (factor, original context, beta_fast, beta_slow)
    yarn: tuple[float, int, float, float] | None = None
    glm: GlmMoe | None = None  # n_layers then counts the NextN blocks too (block_count)

    @property
    def expert_width(self) -> int:
        return self.n_ff_exp or self.n_ff

    @property
    def facts(self) -> ModelFacts:
        return ModelFacts(self.n_layers, self.n_expert, self.n_head, self.n_head_kv)


# Sources: each model's config.json on the Hugging Face hub (allenai/OLMoE-1B-7B-0924,
# Qwen/Qwen1.5-MoE-A2.7B, Qwen/Qwen3-30B-A3B, mistralai/Mixtral-8x7B-v0.1,
# deepseek-ai/DeepSeek-V2-Lite, zai-org/GLM-4.5-Air). Tiny presets keep rows multiples of
# 256 so K-quants apply.
PRESETS: dict[str, dict[str, Preset]] = {
    "olmoe": {
        "olmoe-1b-7b": Preset("olmoe", "OLMoE-1B-7B-0924 (synthetic)", 16, 2048, 16, 16, 128, 50304, 4096,
                              64, 8, 1024, None, 10000.0, 1e-5, qk_norm="full"),
        "tiny": Preset("olmoe", "tiny olmoe (synthetic)", 2, 256, 4, 4, 64, 320, 512, 4, 2, 256, None,
                       10000.0, 1e-5, qk_norm="full"),
    },
    "qwen2moe": {
        "qwen1.5-moe-a2.7b": Preset("qwen2moe", "Qwen1.5-MoE-A2.7B (synthetic)", 24, 2048, 16, 16, 128, 151936,
                                    8192, 60, 4, 5632, 1408, 1e6, 1e-6, n_ff_shexp=5632, qkv_bias=True),
        "tiny": Preset("qwen2moe", "tiny qwen2moe (synthetic)", 2, 256, 4, 4, 64, 320, 512, 4, 2, 512, 256,
                       1e6, 1e-6, n_ff_shexp=512, qkv_bias=True),
    },
    "qwen3moe": {
        "qwen3-30b-a3b": Preset("qwen3moe", "Qwen3-30B-A3B (synthetic)", 48, 2048, 32, 4, 128, 151936, 40960,
                                128, 8, 6144, 768, 1e6, 1e-6, qk_norm="per_head"),
        "tiny": Preset("qwen3moe", "tiny qwen3moe (synthetic)", 2, 256, 4, 2, 128, 320, 512, 4, 2, 512, 256,
                       1e6, 1e-6, qk_norm="per_head"),
    },
    "llama": {
        "mixtral-8x7b": Preset("llama", "Mixtral-8x7B-v0.1 (synthetic)", 32, 4096, 32, 8, 128, 32000, 32768,
                               8, 2, 14336, None, 1e6, 1e-5),
        "tiny": Preset("llama", "tiny mixtral (synthetic)", 2, 256, 4, 2, 64, 320, 512, 8, 2, 256, None,
                       1e6, 1e-5),
    },
    "deepseek2": {
        "deepseek-v2-lite": Preset("deepseek2", "DeepSeek-V2-Lite (synthetic)", 27, 2048, 16, 1, 192, 102400,
                                   163840, 64, 6, 10944, 1408, 10000.0, 1e-6,
                                   mla=MLA(512, 0, 128, 64, 128, 1, 2, yarn=(40.0, 4096, 0.707))),
        # llama.cpp asks for q_lora_rank unless the model has 26/27 layers: the tiny one has it.
        "tiny": Preset("deepseek2", "tiny deepseek2 (synthetic)", 2, 256, 2, 1, 96, 320, 512, 4, 2, 512, 256,
                       10000.0, 1e-6, mla=MLA(256, 256, 64, 32, 64, 1, 1)),
    },
    # openai/gpt-oss-20b and gpt-oss-120b config.json: hidden 2880, 64 query heads and 8 KV
    # heads of 64, 201088 tokens, expert width 2880, 32 / 128 experts, top-4, sliding window
    # 128 on even layers, YaRN factor 32 over 4096, rope base 150000. Their release GGUFs
    # are `--quant MXFP4_MOE` (tools/quant_mix.py).
    "gpt-oss": {
        "gpt-oss-20b": Preset("gpt-oss", "gpt-oss-20b (synthetic)", 24, 2880, 64, 8, 64, 201088, 131072,
                              32, 4, 2880, 2880, 150000.0, 1e-5, sliding_window=128,
                              yarn=(32.0, 4096, 32.0, 1.0)),
        "gpt-oss-120b": Preset("gpt-oss", "gpt-oss-120b (synthetic)", 36, 2880, 64, 8, 64, 201088, 131072,
                               128, 4, 2880, 2880, 150000.0, 1e-5, sliding_window=128,
                               yarn=(32.0, 4096, 32.0, 1.0)),
        # a window of 4: shorter than the tests' prompts, so it matters
        "tiny": Preset("gpt-oss", "tiny gpt-oss (synthetic)", 2, 256, 4, 2, 64, 320, 512, 4, 2, 256, 256,
                       150000.0, 1e-5, sliding_window=4, yarn=(32.0, 4096, 32.0, 1.0)),
    },
    # 46 layers + 1 NextN block; head_dim 128 with 96 heads (wider than hidden 4096)
    "glm4moe": {
        "glm-4.5-air": Preset("glm4moe", "GLM-4.5-Air (synthetic)", 47, 4096, 96, 8, 128, 151552, 131072,
                              128, 8, 10944, 1408, 1e6, 1e-5, qkv_bias=True,
                              glm=GlmMoe(n_dense_lead=1, n_shared_experts=1, rope_dims=64, weights_scale=1.0)),
        "tiny": Preset("glm4moe", "tiny glm4moe (synthetic)", 4, 256, 4, 2, 128, 320, 512, 8, 2, 768, 256,
                       1e6, 1e-5, qkv_bias=True,
                       glm=GlmMoe(n_dense_lead=1, n_shared_experts=1, rope_dims=64, weights_scale=2.5)),
    },
}


def get_preset(arch: str | None, name: str) -> Preset:
    """The preset `name`; `arch` may be None when only one architecture has a preset of that name."""
    if arch is None:
        archs = [a for a, presets in PRESETS.items() if name in presets]
        if len(archs) != 1:
            known = "; ".join(f"{a}: {', '.join(p)}" for a, p in PRESETS.items())
            raise MoestreamError(f"preset {name!r} is in {', '.join(archs)}: add --arch" if archs else
                                 f"no preset {name!r}; the presets are {known}")
        arch = archs[0]
    if arch not in PRESETS:
        raise MoestreamError(f"no synthetic presets for architecture {arch!r}; one of {', '.join(PRESETS)}")
    if name not in PRESETS[arch]:
        raise MoestreamError(f"{arch} has no preset {name!r}; one of {', '.join(PRESETS[arch])}")
    return PRESETS[arch][name]


# -- tensors ------------------------------------------------------------------------------
def tensor_shapes(p: Preset) -> list[TensorShape]:
    """Every tensor of the model in file order; numpy shapes (the row is the last dim)."""
    shapes = [TensorShape("token_embd.weight", (p.n_vocab, p.n_embd))]
    if p.arch == "gpt-oss":
        shapes += [TensorShape(f"blk.{i}.{name}", shape) for i in range(p.n_layers) for name, shape in _gptoss_layer(p)]
        return shapes + _output(p)
    if p.glm:
        return shapes + _glm_layers(p) + _output(p)
    for i in range(p.n_layers):
        layer = [*(_mla_attention(p) if p.mla else _attention(p)), ("ffn_norm.weight", (p.n_embd,))]
        layer += _dense_ffn(p) if p.mla and i < p.mla.n_dense_lead else _moe_ffn(p)
        shapes += [TensorShape(f"blk.{i}.{name}", shape) for name, shape in layer]
    return shapes + _output(p)


def _output(p: Preset) -> list[TensorShape]:
    return [TensorShape("output_norm.weight", (p.n_embd,)), TensorShape("output.weight", (p.n_vocab, p.n_embd))]


def _glm_layers(p: Preset) -> list[TensorShape]:
    g, d = p.glm, p.n_embd
    shapes = []
    for i in range(p.n_layers):
        layer = [*_attention(p), ("post_attention_norm.weight", (d,))]
        if i < g.n_dense_lead:
            layer += _dense_ffn(p)
        else:
            layer += [*_moe_ffn(p), ("exp_probs_b.bias", (p.n_expert,))]
        if i >= p.n_layers - g.n_nextn:
            layer += [("nextn.eh_proj.weight", (d, 2 * d)), ("nextn.enorm.weight", (d,)),
                      ("nextn.hnorm.weight", (d,)), ("nextn.shared_head_norm.weight", (d,))]
        shapes += [TensorShape(f"blk.{i}.{name}", shape) for name, shape in layer]
    return shapes


def _attention(p: Preset) -> list[tuple[str, tuple[int, ...]]]:
    d, q, kv = p.n_embd, p.n_head * p.head_dim, p.n_head_kv * p.head_dim
    parts = [("attn_norm.weight", (d,)), ("attn_q.weight", (q, d)), ("attn_k.weight", (kv, d)),
             ("attn_v.weight", (kv, d)), ("attn_output.weight", (d, q))]
    if p.qkv_bias:
        parts += [("attn_q.bias", (q,)), ("attn_k.bias", (kv,)), ("attn_v.bias", (kv,))]
    if p.qk_norm == "full":
        parts += [("attn_q_norm.weight", (q,)), ("attn_k_norm.weight", (kv,))]
    elif p.qk_norm == "per_head":
        parts += [("attn_q_norm.weight", (p.head_dim,)), ("attn_k_norm.weight", (p.head_dim,))]
    return parts


def _gptoss_layer(p: Preset) -> list[tuple[str, tuple[int, ...]]]:
    """gpt-oss as llama.cpp's converter names it: biases everywhere, sinks, post_attention_norm."""
    d, q, kv, e, f = p.n_embd, p.n_head * p.head_dim, p.n_head_kv * p.head_dim, p.n_expert, p.expert_width
    return [("attn_norm.weight", (d,)), ("attn_q.weight", (q, d)), ("attn_q.bias", (q,)),
            ("attn_k.weight", (kv, d)), ("attn_k.bias", (kv,)), ("attn_v.weight", (kv, d)), ("attn_v.bias", (kv,)),
            ("attn_output.weight", (d, q)), ("attn_output.bias", (d,)), ("attn_sinks.weight", (p.n_head,)),
            ("post_attention_norm.weight", (d,)), ("ffn_gate_inp.weight", (e, d)), ("ffn_gate_inp.bias", (e,)),
            ("ffn_gate_exps.weight", (e, f, d)), ("ffn_gate_exps.bias", (e, f)),
            ("ffn_up_exps.weight", (e, f, d)), ("ffn_up_exps.bias", (e, f)),
            ("ffn_down_exps.weight", (e, d, f)), ("ffn_down_exps.bias", (e, d))]


def _mla_attention(p: Preset) -> list[tuple[str, tuple[int, ...]]]:
    m, d, h = p.mla, p.n_embd, p.n_head
    q_out = h * (m.qk_nope_dim + m.qk_rope_dim)
    if m.q_lora_rank:
        q_parts = [("attn_q_a.weight", (m.q_lora_rank, d)), ("attn_q_a_norm.weight", (m.q_lora_rank,)),
                   ("attn_q_b.weight", (q_out, m.q_lora_rank))]
    else:
        q_parts = [("attn_q.weight", (q_out, d))]
    return [("attn_norm.weight", (d,)), *q_parts,
            ("attn_kv_a_mqa.weight", (m.kv_lora_rank + m.qk_rope_dim, d)),
            ("attn_kv_a_norm.weight", (m.kv_lora_rank,)),
            ("attn_k_b.weight", (h, m.kv_lora_rank, m.qk_nope_dim)),
            ("attn_v_b.weight", (h, m.v_head_dim, m.kv_lora_rank)),
            ("attn_output.weight", (d, h * m.v_head_dim))]


def _dense_ffn(p: Preset) -> list[tuple[str, tuple[int, ...]]]:
    return [("ffn_gate.weight", (p.n_ff, p.n_embd)), ("ffn_up.weight", (p.n_ff, p.n_embd)),
            ("ffn_down.weight", (p.n_embd, p.n_ff))]


def _moe_ffn(p: Preset) -> list[tuple[str, tuple[int, ...]]]:
    d, e, f = p.n_embd, p.n_expert, p.expert_width
    parts = [("ffn_gate_inp.weight", (e, d)), ("ffn_gate_exps.weight", (e, f, d)),
             ("ffn_up_exps.weight", (e, f, d)), ("ffn_down_exps.weight", (e, d, f))]
    n_shared = p.mla.n_shared_experts if p.mla else p.glm.n_shared_experts if p.glm else 0
    shared = p.n_ff_shexp or n_shared * f
    if p.n_ff_shexp:
        parts.append(("ffn_gate_inp_shexp.weight", (d,)))
    if shared:
        parts += [("ffn_gate_shexp.weight", (shared, d)), ("ffn_up_shexp.weight", (shared, d)),
                  ("ffn_down_shexp.weight", (d, shared))]
    return parts


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    qtype: Q

    @property
    def n_rows(self) -> int:
        return math.prod(self.shape[:-1])

    @property
    def row_bytes(self) -> int:
        block_size, type_size = GGML_QUANT_SIZES[self.qtype]
        return self.shape[-1] // block_size * type_size

    @property
    def nbytes(self) -> int:
        return self.n_rows * self.row_bytes


def plan(preset: Preset, quant: str) -> list[PlannedTensor]:
    shapes = tensor_shapes(preset)
    types = tensor_types(shapes, quant, preset.facts)
    return [PlannedTensor(t.name, t.shape, types[t.name]) for t in shapes]


# -- metadata -----------------------------------------------------------------------------
def _add_metadata(w: gguf.GGUFWriter, p: Preset, quant: str) -> None:
    w.add_name(p.model)
    w.add_file_type(file_type(quant)[0])
    w.add_block_count(p.n_layers)
    w.add_context_length(p.n_ctx)
    w.add_embedding_length(p.n_embd)
    w.add_feed_forward_length(p.n_ff)
    w.add_head_count(p.n_head)
    w.add_head_count_kv(p.n_head_kv)
    w.add_rope_freq_base(p.rope_base)
    w.add_layer_norm_rms_eps(p.rms_eps)
    w.add_expert_count(p.n_expert)
    w.add_expert_used_count(p.n_expert_used)
    w.add_vocab_size(p.n_vocab)
    if p.n_ff_exp is not None:
        w.add_expert_feed_forward_length(p.n_ff_exp)
    if p.n_ff_shexp:
        w.add_expert_shared_feed_forward_length(p.n_ff_shexp)
    if p.mla:
        _add_mla_metadata(w, p.mla)
    else:
        w.add_key_length(p.head_dim)
        w.add_value_length(p.head_dim)
        w.add_rope_dimension_count(p.glm.rope_dims if p.glm else p.head_dim)
    if p.sliding_window:
        w.add_sliding_window(p.sliding_window)
    if p.yarn:
        factor, original_ctx, beta_fast, beta_slow = p.yarn
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(factor)
        w.add_rope_scaling_orig_ctx_len(original_ctx)
        w.add_rope_scaling_yarn_beta_fast(beta_fast)
        w.add_rope_scaling_yarn_beta_slow(beta_slow)
    if p.glm:
        _add_glm_metadata(w, p.glm)


def _add_mla_metadata(w: gguf.GGUFWriter, m: MLA) -> None:
    """What convert_hf_to_gguf writes for DeepSeek-V2: MLA stored as one latent KV head."""
    w.add_leading_dense_block_count(m.n_dense_lead)
    w.add_kv_lora_rank(m.kv_lora_rank)
    if m.q_lora_rank:
        w.add_q_lora_rank(m.q_lora_rank)
    w.add_key_length(m.kv_lora_rank + m.qk_rope_dim)
    w.add_value_length(m.kv_lora_rank)
    w.add_key_length_mla(m.qk_nope_dim + m.qk_rope_dim)
    w.add_value_length_mla(m.v_head_dim)
    w.add_expert_shared_count(m.n_shared_experts)
    w.add_expert_weights_scale(1.0)
    w.add_rope_dimension_count(m.qk_rope_dim)
    if m.yarn:
        factor, original_ctx, mscale_all_dim = m.yarn
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(factor)
        w.add_rope_scaling_orig_ctx_len(original_ctx)
        w.add_rope_scaling_yarn_log_mul(0.1 * mscale_all_dim)


def _add_glm_metadata(w: gguf.GGUFWriter, g: GlmMoe) -> None:
    """What convert_hf_to_gguf writes for GLM-4.5 (conversion/glm.py, Glm4MoeModel)."""
    w.add_expert_shared_count(g.n_shared_experts)
    w.add_leading_dense_block_count(g.n_dense_lead)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_expert_weights_scale(g.weights_scale)
    w.add_expert_weights_norm(True)
    w.add_nextn_predict_layers(g.n_nextn)


# -- weights ------------------------------------------------------------------------------
# Quant bits are numpy's fast random bytes (several hundred MB/s on one core); every float
# field (scales, mins) is +-2**u, u uniform in [-8, 0], as kernels.formats.random_blocks
# makes them, then rescaled so that a decoded weight has the standard deviation wanted.
def _random_blocks(qtype: Q, n_blocks: int, rng: np.random.Generator, factor: float) -> np.ndarray:
    """[n_blocks, type_size] uint8 blocks whose float fields are finite: random_blocks'
    distribution with every float field multiplied by `factor`."""
    fmt = block_format(qtype)
    if fmt.nibble_fp16_scale_offset is not None:
        raise MoestreamError(f"synthetic {qtype.name} weights are not supported; pick another --quant")
    blocks = np.frombuffer(rng.bytes(n_blocks * fmt.type_size), dtype=np.uint8).reshape(n_blocks, fmt.type_size)
    blocks = blocks.copy()  # frombuffer views immutable bytes
    if fmt.e8m0_scale_offset is not None:  # MXFP4: a power-of-two scale 2**(e - 128), near factor
        exponent = 128 + round(math.log2(factor)) - rng.integers(0, 2, n_blocks)
        blocks[:, fmt.e8m0_scale_offset] = np.clip(exponent, 1, 254).astype(np.uint8)
    for f in fmt.fields:
        if f.dtype.is_floating_point:
            count = f.size // f.dtype.itemsize
            values = _moderate_floats((n_blocks, count), rng) * np.float32(factor)
            raw = torch.from_numpy(values).to(f.dtype).view(torch.uint8).numpy()
            blocks[:, f.offset : f.end] = raw.reshape(n_blocks, f.size)
    return blocks


def _moderate_floats(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    magnitude = np.exp2(-8 * rng.random(shape, dtype=np.float32))
    return np.where(rng.integers(0, 2, shape, dtype=np.uint8), magnitude, -magnitude)


@functools.cache
def _unit_std(qtype: Q) -> float:
    """Standard deviation of the values `_random_blocks` of this type decode to (factor 1)."""
    blocks = _random_blocks(qtype, 512, np.random.default_rng(0), 1.0)
    return float(np.std(gguf.quants.dequantize(blocks, qtype)))


def _f32_values(t: PlannedTensor, n: int, rng: np.random.Generator) -> np.ndarray:
    """F32 tensors: norms near 1, routers and biases small random values."""
    noise = rng.standard_normal(n, dtype=np.float32)
    if t.name.endswith("norm.weight"):
        return 1.0 + 0.1 * noise
    return noise / np.float32(math.sqrt(t.shape[-1]))


def _chunks(t: PlannedTensor, rng: np.random.Generator) -> Iterator[bytes]:
    rows_per_chunk = max(1, CHUNK_BYTES // t.row_bytes)
    factor = 1.0 / (math.sqrt(t.shape[-1]) * _unit_std(t.qtype)) if t.qtype != Q.F32 else 1.0
    for start in range(0, t.n_rows, rows_per_chunk):
        n_rows = min(rows_per_chunk, t.n_rows - start)
        if t.qtype == Q.F32:
            yield _f32_values(t, n_rows * t.shape[-1], rng).tobytes()
            continue
        n_blocks = n_rows * t.row_bytes // GGML_QUANT_SIZES[t.qtype][1]
        yield _random_blocks(t.qtype, n_blocks, rng, factor).tobytes()


# -- the file -----------------------------------------------------------------------------
def chat_format(preset: Preset) -> tuple[BpeVocab, str]:
    """The vocab and chat template a synthetic file carries: gpt-oss speaks harmony (so the
    server splits reasoning from the answer as on the real file), every other arch ChatML."""
    if preset.arch == "gpt-oss":
        return byte_level_bpe_vocab(preset.n_vocab, HARMONY_CONTROL_TOKENS, "<|return|>"), HARMONY_TEMPLATE
    return byte_level_bpe_vocab(preset.n_vocab), CHATML_TEMPLATE


def write_synthetic(path: str | Path, preset: Preset, quant: str, seed: int = 0,
                    random_weights: bool = True, progress: bool = True) -> list[PlannedTensor]:
    """Write the model to `path` and return its tensors.

    random_weights=False writes metadata and tensor infos only and leaves the data section a
    sparse hole of zeros: a valid file of the full size that costs no disk and no time
    (for checking shapes and types, or a quantizer's dry run).
    """
    path = Path(path)
    tensors = plan(preset, quant)
    writer = gguf.GGUFWriter(path, preset.arch)
    _add_metadata(writer, preset, quant)
    add_tokenizer(writer, *chat_format(preset))
    for t in tensors:
        byte_shape = (*t.shape[:-1], t.row_bytes)
        writer.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), t.nbytes, raw_dtype=t.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    alignment = writer.data_alignment
    writer.close()
    with open(path, "r+b") as f:
        f.seek(0, 2)
        data_start = _pad(f.tell(), alignment)
        end = data_start + sum(_pad(t.nbytes, alignment) for t in tensors)
        if random_weights:
            _write_data(f, tensors, data_start, alignment, seed, progress)
        f.truncate(end)
    return tensors


def _pad(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def _write_data(f, tensors: list[PlannedTensor], offset: int, alignment: int, seed: int,
                progress: bool) -> None:
    rng = np.random.default_rng(seed)
    with tqdm(total=sum(t.nbytes for t in tensors), unit="B", unit_scale=True, disable=not progress,
              desc="writing weights") as bar:
        for t in tensors:
            f.seek(offset)
            for chunk in _chunks(t, rng):
                f.write(chunk)
                bar.update(len(chunk))
            offset += _pad(t.nbytes, alignment)


# -- command line -------------------------------------------------------------------------
def add_synth_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", default=None, choices=sorted(PRESETS),
                        help="GGUF architecture (Mixtral is 'llama'; deepseek2 is written but not served yet); "
                             "needed only for a preset name several architectures have (tiny)")
    parser.add_argument("--preset", required=True,
                        help="model shape: " + "; ".join(f"{a}: {', '.join(p)}" for a, p in PRESETS.items()))
    parser.add_argument("--quant", default="Q4_K_M", choices=list(FILE_TYPES),
                        help="llama.cpp file type whose per-tensor mix to reproduce")
    parser.add_argument("-o", "--output", required=True, help="path of the .gguf file to write")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--no-weights", action="store_true",
                        help="write the exact header and leave the tensor data a sparse hole: the full "
                             "file size on no disk, for `moestream inspect` plans (default: random weights)")


def synth_main(args: argparse.Namespace) -> int:
    preset = get_preset(args.arch, args.preset)
    tensors = write_synthetic(args.output, preset, args.quant, seed=args.seed, random_weights=not args.no_weights)
    size_gb = Path(args.output).stat().st_size / 1e9
    what = "header only (sparse data)" if args.no_weights else "random weights"
    print(f"wrote {args.output}: {preset.model}, {args.quant}, {len(tensors)} tensors, {size_gb:.2f} GB, {what}")
    if preset.arch not in ARCHITECTURES:
        print(f"note: moestream cannot run {preset.arch} models yet; llama.cpp can")
    return 0
