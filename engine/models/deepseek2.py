"""deepseek2 (DeepSeek-V2/V2-Lite, GLM-4.7-Flash): multi-head latent attention over the
shared blocks (leading dense layers, routed + shared experts, the router the metadata
describes: softmax top-k for V2, sigmoid with a correction bias, normalised and scaled
for GLM-4.7-Flash).

Each token's K and V for all heads come from one latent of kv_lora_rank (RMS-normed) plus a
rope part of qk_rope_dim shared by the heads; the KV cache keeps only those two, about 1/9
of V2-Lite's per-head K and V. llama.cpp's converter stores kv_b as k_b (transposed) and
v_b, so both are absorbed, as llama.cpp does: the query's no-rope part goes through k_b into
latent space, attention runs there against the cached latents (scores over latent + rope
part, values = the latents), and v_b takes each head's result back out. A decode step reads
only the latents.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moestream.engine.config import MLAConfig
from moestream.engine.kv_cache import KVCache
from moestream.engine.layers import Linear, rms_norm
from moestream.engine.loader import GGUFModelFile
from moestream.engine.model import BatchInput, MoEModel
from moestream.engine.yarn_rope import YarnRope


@dataclass
class MLAWeights:
    wq: Linear | None  # x -> q of every head, without a q LoRA rank
    wq_a: Linear | None  # with one: x -> rank, norm, -> q
    q_a_norm: torch.Tensor | None
    wq_b: Linear | None
    wkv_a: Linear  # x -> [latent, rope part]
    kv_a_norm: torch.Tensor  # [kv_lora_rank]
    k_b: torch.Tensor  # [H, kv_lora_rank, qk_nope]: a head's no-rope query -> latent space
    v_b: torch.Tensor  # [H, v_head_dim, kv_lora_rank]: latent space -> a head's value
    wo: Linear


@dataclass
class MLALayerWeights:
    attn_norm: torch.Tensor
    attn: MLAWeights
    ffn_norm: torch.Tensor
    router: torch.Tensor | None  # None in a leading dense layer
    shared: tuple[Linear, Linear, Linear] | None
    expert_bias: torch.Tensor | None  # exp_probs_b: sigmoid routers' correction bias
    dense_ffn: tuple[Linear, Linear, Linear] | None  # gate, up, down of a leading dense layer
    shared_gate: torch.Tensor | None = None  # deepseek2's shared experts are ungated


def latent_attention(q: torch.Tensor, cache: torch.Tensor, kv_lora_rank: int, scale: float) -> torch.Tensor:
    """Causal attention of the last n positions in latent space: q [n, H, W] against the
    cached [ctx, W] rows (latent, then rope part), values = their latents. -> [n, H, kv_lora_rank]."""
    n, ctx = q.shape[0], cache.shape[0]
    latents = cache[:, :kv_lora_rank]
    if n == 1:  # decode: two matmuls reading the cache's rows in place
        scores = (q[0] @ cache.T) * scale  # [H, ctx]
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(latents.dtype)
        return (probs @ latents)[None]
    qpos = torch.arange(ctx - n, ctx, device=q.device)[:, None]
    mask = torch.arange(ctx, device=q.device)[None, :] <= qpos  # [n, ctx]
    out = F.scaled_dot_product_attention(q.transpose(0, 1), cache[None], latents[None], attn_mask=mask,
                                         scale=scale, enable_gqa=True)  # [H, n, kv_lora_rank]
    return out.transpose(0, 1)


class Deepseek2Model(MoEModel):
    def __init__(self, file: GGUFModelFile, *args, **kwargs):
        super().__init__(file, *args, **kwargs)
        cfg = self.config
        if cfg.yarn is not None:
            # llama.cpp cancels YaRN's cos/sin scale for deepseek2 (its attention factor times
            # 1 / (1 + 0.1 ln factor)): the scale goes into the attention instead
            yarn = cfg.yarn
            grow = yarn.mscale / yarn.attn_factor
            unscaled = dataclasses.replace(yarn, attn_factor=yarn.attn_factor / grow)
            self.rope = YarnRope(cfg.spec.rope, cfg.rope_dims, cfg.rope_base, unscaled, self.device)
        self.attn_scale = cfg.mla.attention_mscale**2 / math.sqrt(cfg.mla.qk_head_dim)

    def _layer(self, file: GGUFModelFile, i: int) -> MLALayerWeights:
        p = f"blk.{i}."
        m: MLAConfig = self.config.mla
        lora = m.q_lora_rank > 0
        attn = MLAWeights(
            wq=None if lora else self._linear(file, p + "attn_q.weight"),
            wq_a=self._linear(file, p + "attn_q_a.weight") if lora else None,
            q_a_norm=self._dense(file, p + "attn_q_a_norm.weight") if lora else None,
            wq_b=self._linear(file, p + "attn_q_b.weight") if lora else None,
            wkv_a=self._linear(file, p + "attn_kv_a_mqa.weight"),
            kv_a_norm=self._dense(file, p + "attn_kv_a_norm.weight"),
            k_b=self._dense(file, p + "attn_k_b.weight"),
            v_b=self._dense(file, p + "attn_v_b.weight"),
            wo=self._linear(file, p + "attn_output.weight"),
        )
        is_dense = i < self.config.n_dense_layers
        return MLALayerWeights(
            attn_norm=self._dense(file, p + "attn_norm.weight"),
            attn=attn,
            ffn_norm=self._dense(file, p + "ffn_norm.weight"),
            router=None if is_dense else self._dense(file, p + "ffn_gate_inp.weight"),
            shared=None if is_dense else self._swiglu(file, p + "ffn_{}_shexp.weight"),
            expert_bias=None if is_dense else self._optional(file, p + "exp_probs_b.bias"),
            dense_ffn=self._swiglu(file, p + "ffn_{}.weight") if is_dense else None,
        )

    def _attention(self, i: int, lw: MLALayerWeights, x: torch.Tensor, batch: BatchInput,
                   kv: KVCache, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        cfg, m, a = self.config, self.config.mla, lw.attn
        T, H = x.shape[0], cfg.n_heads
        q = a.wq(x) if a.wq is not None else a.wq_b(rms_norm(a.wq_a(x), a.q_a_norm, cfg.rms_eps))
        q_nope, q_pe = q.view(T, H, m.qk_head_dim).split([m.qk_nope_dim, m.qk_rope_dim], dim=-1)
        latent, k_pe = a.wkv_a(x).split([m.kv_lora_rank, m.qk_rope_dim], dim=-1)  # [T, rank], [T, rope]
        latent = rms_norm(latent, a.kv_a_norm, cfg.rms_eps)
        k_pe = self.rope(k_pe.reshape(T, 1, m.qk_rope_dim), rope)[:, 0]
        q_latent = torch.bmm(q_nope.transpose(0, 1), a.k_b.transpose(1, 2)).transpose(0, 1)  # [T, H, rank]
        q = torch.cat([q_latent, self.rope(q_pe, rope)], dim=-1)  # [T, H, W]
        entry = torch.cat([latent, k_pe], dim=-1)[:, None]  # [T, 1, W]: what the cache keeps
        out = torch.empty(T, H, m.kv_lora_rank, dtype=x.dtype, device=x.device)
        for seg in batch.segments:
            rows = slice(seg.offset, seg.offset + seg.n_new)
            kv.write(i, seg.new_slots, entry[rows], entry[rows, :, :0])
            cache, _ = kv.read(i, seg.context_slots)  # [ctx, 1, W]
            out[rows] = latent_attention(q[rows], cache[:, 0].to(x.dtype), m.kv_lora_rank, self.attn_scale)
        out = torch.bmm(out.transpose(0, 1), a.v_b.transpose(1, 2))  # [H, T, v_head_dim]
        return a.wo(out.transpose(0, 1).reshape(T, H * m.v_head_dim))
