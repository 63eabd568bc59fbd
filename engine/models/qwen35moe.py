"""Qwen3.5/3.6 MoE (GGUF arch `qwen35moe`): Gated DeltaNet layers and gated full-attention
layers, each followed by routed experts plus a sigmoid-gated shared expert.

Built from the shared blocks: the embedding, norms, rope, KV attention and the MoE layer
(routing, expert cache, shared expert) are MoEModel's; what is new is the token mixer of
each layer. DeltaNet layers keep a per-sequence state in a RecurrentStatePool that the
engine hands over as `states`; attention layers keep K/V in the KV cache, which holds only
those layers (`config.attention_layers`). Tensor names: engine/loader.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from moestream.engine.deltanet import (causal_conv, causal_conv_step, delta_rule_chunked, delta_rule_step_,
                                       l2_normalize)
from moestream.engine.kv_cache import KVCache
from moestream.engine.layers import Linear, rms_norm
from moestream.engine.loader import GGUFModelFile
from moestream.engine.model import BatchInput, MoEModel
from moestream.engine.recurrent_state import RecurrentStatePool


@dataclass
class DeltaNetWeights:
    qkv: Linear  # x -> q, k, v of every head, the convolution's input
    z: Linear  # x -> the output gate (attn_gate)
    conv: torch.Tensor  # [channels, kernel]
    dt_bias: torch.Tensor  # [v_heads]
    a: torch.Tensor  # [v_heads]: -exp(A_log), the decay rate
    alpha: Linear  # x -> [v_heads], the time step before softplus
    beta: Linear  # x -> [v_heads], the write strength before sigmoid
    norm: torch.Tensor  # [v_dim]: RMSNorm of each head's output, before the gate
    out: Linear
    state_layer: int  # this layer's index in the RecurrentStatePool


@dataclass
class GatedAttentionWeights:
    wq: Linear  # x -> per head [query, gate]
    wk: Linear
    wv: Linear
    wo: Linear
    q_norm: torch.Tensor
    k_norm: torch.Tensor
    kv_layer: int  # this layer's index in the KV cache


@dataclass
class HybridLayerWeights:
    attn_norm: torch.Tensor
    mixer: DeltaNetWeights | GatedAttentionWeights
    ffn_norm: torch.Tensor  # post_attention_norm in the file
    router: torch.Tensor
    shared: tuple[Linear, Linear, Linear]
    shared_gate: torch.Tensor
    expert_bias: torch.Tensor | None = None  # MoEModel.route reads it; qwen35moe has none


Index = slice | torch.Tensor  # a consecutive run (a view, updated in place) or ids (gathered)


def _index(values: list[int], device: torch.device) -> Index:
    if values == list(range(values[0], values[0] + len(values))):
        return slice(values[0], values[0] + len(values))
    return torch.tensor(values, device=device)


@dataclass
class StateRows:
    """Which batch rows advance which state slots, worked out once per forward. Decode
    rows come first in a batch and slots are handed out lowest first, so both are usually
    consecutive runs: the states are then updated in place, without a gather and scatter
    of 2 MiB per sequence and layer at Qwen3.6-35B-A3B's size."""

    decode_rows: Index | None  # one-token segments: their rows, updated together
    decode_slots: Index | None
    prefills: list[tuple[slice, int]] = field(default_factory=list)  # (rows, slot) of longer ones

    @classmethod
    def of(cls, batch: BatchInput, device: torch.device) -> StateRows:
        decodes = [s for s in batch.segments if s.n_new == 1]
        rows = slots = None
        if decodes:
            rows = _index([s.offset for s in decodes], device)
            slots = _index([s.state_slot for s in decodes], device)
        prefills = [(slice(s.offset, s.offset + s.n_new), s.state_slot) for s in batch.segments if s.n_new > 1]
        return cls(rows, slots, prefills)


class Qwen35MoeModel(MoEModel):
    states: RecurrentStatePool | None = None  # set by the engine before the first forward

    def _layer(self, file: GGUFModelFile, i: int) -> HybridLayerWeights:
        p = f"blk.{i}."
        recurrent = self.config.linear.recurrent_layers
        if recurrent[i]:
            mixer = DeltaNetWeights(
                qkv=self._linear(file, p + "attn_qkv.weight"), z=self._linear(file, p + "attn_gate.weight"),
                conv=self._dense(file, p + "ssm_conv1d.weight").float(),
                dt_bias=self._dense(file, p + "ssm_dt.bias").float(), a=self._dense(file, p + "ssm_a").float(),
                alpha=self._linear(file, p + "ssm_alpha.weight"), beta=self._linear(file, p + "ssm_beta.weight"),
                norm=self._dense(file, p + "ssm_norm.weight"), out=self._linear(file, p + "ssm_out.weight"),
                state_layer=sum(recurrent[:i]))
        else:
            mixer = GatedAttentionWeights(
                wq=self._linear(file, p + "attn_q.weight"), wk=self._linear(file, p + "attn_k.weight"),
                wv=self._linear(file, p + "attn_v.weight"), wo=self._linear(file, p + "attn_output.weight"),
                q_norm=self._dense(file, p + "attn_q_norm.weight"),
                k_norm=self._dense(file, p + "attn_k_norm.weight"),
                kv_layer=self.config.attention_layers.index(i))
        return HybridLayerWeights(
            attn_norm=self._dense(file, p + "attn_norm.weight"),
            mixer=mixer,
            ffn_norm=self._dense(file, p + "post_attention_norm.weight"),
            router=self._dense(file, p + "ffn_gate_inp.weight"),
            shared=tuple(self._linear(file, f"{p}ffn_{n}_shexp.weight") for n in ("gate", "up", "down")),
            shared_gate=self._dense(file, p + "ffn_gate_inp_shexp.weight").reshape(-1),
        )

    @torch.inference_mode()
    def forward(self, batch: BatchInput, kv: KVCache) -> torch.Tensor:
        """Logits [len(batch.logits_rows), vocab] (float32); DeltaNet states advance in `states`."""
        eps = self.config.rms_eps
        h = self.embed(batch.token_ids)  # [T, D]
        rope = self.rope.tables(batch.positions)
        state_rows = StateRows.of(batch, h.device)
        for i, layer in enumerate(self.layers):
            x = rms_norm(h, layer.attn_norm, eps)
            if isinstance(layer.mixer, DeltaNetWeights):
                h = h + self._deltanet(layer.mixer, x, state_rows)
            else:
                h = h + self._gated_attention(layer.mixer, x, batch, kv, rope)
            x = rms_norm(h, layer.ffn_norm, eps)
            h = h + self._moe(i, layer, x)
            if self.prefetch and i + 1 < len(self.layers):
                self._prefetch(i + 1, h)
        h = rms_norm(h[batch.logits_rows], self.output_norm, eps)
        return self.lm_head(h).float()

    def _gated_attention(self, lw: GatedAttentionWeights, x: torch.Tensor, batch: BatchInput, kv: KVCache,
                         rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        cfg = self.config
        T, hd = x.shape[0], cfg.head_dim
        q_gate = lw.wq(x).view(T, cfg.n_heads, 2 * hd)
        q, gate = q_gate[..., :hd], q_gate[..., hd:]  # [T, H, hd] each
        k = lw.wk(x).view(T, cfg.n_kv_heads, hd)
        v = lw.wv(x).view(T, cfg.n_kv_heads, hd)
        q, k = rms_norm(q, lw.q_norm, cfg.rms_eps), rms_norm(k, lw.k_norm, cfg.rms_eps)
        q, k = self.rope(q, rope), self.rope(k, rope)
        out = torch.empty(T, cfg.n_heads, hd, dtype=x.dtype, device=x.device)
        for seg in batch.segments:
            rows = slice(seg.offset, seg.offset + seg.n_new)
            kv.write(lw.kv_layer, seg.new_slots, k[rows], v[rows])
            out[rows] = self._attend(q[rows], *kv.read(lw.kv_layer, seg.context_slots))
        return lw.wo((out * torch.sigmoid(gate)).reshape(T, -1))

    def _deltanet(self, lw: DeltaNetWeights, x: torch.Tensor, state_rows: StateRows) -> torch.Tensor:
        lin = self.config.linear
        T = x.shape[0]
        mixed = lw.qkv(x)  # [T, channels]
        beta = torch.sigmoid(lw.beta(x).float())  # [T, Hv]
        g = lw.a * F.softplus(lw.alpha(x).float() + lw.dt_bias)  # [T, Hv], log of the decay, <= 0
        out = torch.empty(T, lin.n_v_heads, lin.head_v_dim, dtype=torch.float32, device=x.device)
        rows = state_rows.decode_rows
        if rows is not None:  # one token per sequence: all sequences in one batched update
            out[rows] = self._deltanet_step(lw, mixed[rows], g[rows], beta[rows], state_rows.decode_slots)
        for rows, slot in state_rows.prefills:
            out[rows] = self._deltanet_prefill(lw, mixed[rows], g[rows], beta[rows], slot)
        z = lw.z(x).view(T, lin.n_v_heads, lin.head_v_dim).float()
        out = rms_norm(out, lw.norm.float(), self.config.rms_eps) * F.silu(z)
        return lw.out(out.reshape(T, -1).to(x.dtype))

    def _qkv_heads(self, conv_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k [n, Hv, dk] (unit length, q scaled) and v [n, Hv, dv] from the convolution's output.
        The converter stores v-heads tiled over the k-heads (v-head h reads k-head h % Hk)."""
        lin = self.config.linear
        n, key_width = conv_out.shape[0], lin.n_k_heads * lin.head_k_dim
        q, k, v = conv_out.float().split([key_width, key_width, lin.n_v_heads * lin.head_v_dim], dim=-1)
        repeat = lin.n_v_heads // lin.n_k_heads
        q = l2_normalize(q.view(n, lin.n_k_heads, lin.head_k_dim)).repeat(1, repeat, 1) * lin.head_k_dim**-0.5
        k = l2_normalize(k.view(n, lin.n_k_heads, lin.head_k_dim)).repeat(1, repeat, 1)
        return q, k, v.reshape(n, lin.n_v_heads, lin.head_v_dim)

    def _deltanet_step(self, lw: DeltaNetWeights, mixed: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                       slots: Index) -> torch.Tensor:
        """One token of each sequence in `slots`: mixed [B, channels] -> [B, Hv, dv]."""
        pool, layer = self.states, lw.state_layer
        conv_out, pool.conv[layer, slots] = causal_conv_step(mixed.float(), pool.conv[layer, slots], lw.conv)
        q, k, v = self._qkv_heads(conv_out)
        state = pool.ssm[layer, slots]  # a view of a slot run; a gathered copy of slot ids
        out = delta_rule_step_(q, k, v, g, beta, state)
        if not isinstance(slots, slice):
            pool.ssm[layer, slots] = state
        return out

    def _deltanet_prefill(self, lw: DeltaNetWeights, mixed: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                          slot: int) -> torch.Tensor:
        """n tokens of one sequence, in one chunked pass: mixed [n, channels] -> [n, Hv, dv]."""
        pool, layer = self.states, lw.state_layer
        conv_out, pool.conv[layer, slot] = causal_conv(mixed.float(), pool.conv[layer, slot], lw.conv)
        q, k, v = self._qkv_heads(conv_out)
        out, pool.ssm[layer, slot] = delta_rule_chunked(q, k, v, g, beta, pool.ssm[layer, slot])
        return out
