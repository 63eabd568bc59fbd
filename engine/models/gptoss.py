"""gpt-oss (GGUF arch `gpt-oss`: gpt-oss-20b/120b): attention with biases and learned sinks,
sliding-window attention on even layers, YaRN rope, a biased router (top-k of the logits,
then a softmax over the k) and experts with biases and the clamped SwiGLU of OpenAI's
reference: (clamp(up, +-7) + 1) * g * sigmoid(1.702 g), g = min(gate, 7).

Built from the shared blocks (embedding, norms, rope, KV cache, expert sources); what is new
is the attention (sinks, window) and the expert FFN, which carries per-expert biases and
this activation. The compiled CPU MoE kernels and the grouped Triton FFN compute plain
SwiGLU without biases, so experts run here one by one through qmatmul (the compiled or
Triton matmul of each projection where the type has one, dequantize + matmul otherwise).
Tensor names: engine/arch_tensors.py (GPTOSS_LAYER_TENSORS).
"""

from __future__ import annotations

from dataclasses import dataclass
from time import perf_counter

import torch
import torch.nn.functional as F

from moestream.engine.kv_cache import KVCache, SlotIndex
from moestream.engine.layers import Linear
from moestream.engine.loader import GGUFModelFile
from moestream.engine.model import BatchInput, MoEModel
from moestream.engine.yarn_rope import YarnRope
from moestream.kernels.dispatch import qmatmul
from moestream.offload.layout import ExpertWeights

SWIGLU_ALPHA = 1.702  # the reference's sigmoid slope
SWIGLU_LIMIT = 7.0  # gate clamped from above, up to +-limit


@dataclass
class GptOssLayerWeights:
    attn_norm: torch.Tensor
    wq: Linear  # all four with their biases
    wk: Linear
    wv: Linear
    wo: Linear
    sinks: torch.Tensor  # [H] float32: each head's learned logit of "attend to nothing"
    window: int | None  # tokens a sliding-window layer sees (the current one included)
    ffn_norm: torch.Tensor  # post_attention_norm in the file
    router: torch.Tensor  # [E, D]
    router_bias: torch.Tensor  # [E]
    gate_bias: torch.Tensor  # [E, F] float32
    up_bias: torch.Tensor  # [E, F]
    down_bias: torch.Tensor  # [E, D]
    shared: None = None  # no shared expert (MoEModel's MoE layer asks)


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    gate = gate.clamp(max=SWIGLU_LIMIT)
    up = up.clamp(-SWIGLU_LIMIT, SWIGLU_LIMIT)
    return (up + 1) * gate * torch.sigmoid(SWIGLU_ALPHA * gate)


def attend_with_sinks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor,
                      window: int | None) -> torch.Tensor:
    """Causal attention of the last n of ctx positions, each head's softmax over its keys and
    its sink logit (the sink's share of the mass goes nowhere); a window keeps the last
    `window` keys of each query. q [n, H, hd]; k, v [ctx, KV, hd] -> [n, H, hd]."""
    n, H, hd = q.shape
    ctx, n_kv = k.shape[0], k.shape[1]
    start = 0 if window is None else max(0, ctx - n - window + 1)  # no query sees keys before it
    k, v = k[start:].float(), v[start:].float()
    qpos = torch.arange(ctx - n, ctx, device=q.device)[:, None]
    kpos = torch.arange(start, ctx, device=q.device)[None, :]
    allowed = kpos <= qpos
    if window is not None:
        allowed &= kpos > qpos - window
    qg = q.float().view(n, n_kv, H // n_kv, hd)  # the heads sharing a KV head
    scores = torch.einsum("nkgd,ckd->kgnc", qg, k) * hd**-0.5  # [KV, group, n, keys]
    scores = scores.masked_fill(~allowed, float("-inf"))
    sink = sinks.float().view(n_kv, H // n_kv, 1, 1).expand(-1, -1, n, 1)
    probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    out = torch.einsum("kgnc,ckd->nkgd", probs, v)  # [n, KV, group, hd]
    return out.reshape(n, H, hd).to(q.dtype)


def _last(index: SlotIndex, n: int) -> SlotIndex:
    """The last n slots of a sequence's context (all of them if it is shorter)."""
    if isinstance(index, slice):
        return slice(max(index.start, index.stop - n), index.stop)
    return index[-n:]


class GptOssModel(MoEModel):
    def __init__(self, file: GGUFModelFile, *args, **kwargs):
        super().__init__(file, *args, **kwargs)
        cfg = self.config
        if cfg.yarn is not None:
            self.rope = YarnRope(cfg.spec.rope, cfg.rope_dims, cfg.rope_base, cfg.yarn, self.device)

    def _layer(self, file: GGUFModelFile, i: int) -> GptOssLayerWeights:
        p = f"blk.{i}."
        attn = {n: self._linear(file, f"{p}attn_{n}.weight", f"{p}attn_{n}.bias") for n in ("q", "k", "v", "output")}
        bias = {n: self._dense(file, f"{p}ffn_{n}_exps.bias").float() for n in ("gate", "up", "down")}
        return GptOssLayerWeights(
            attn_norm=self._dense(file, p + "attn_norm.weight"),
            wq=attn["q"], wk=attn["k"], wv=attn["v"], wo=attn["output"],
            sinks=self._dense(file, p + "attn_sinks.weight").float(),
            window=self.config.sliding_window if self.config.is_sliding(i) else None,
            ffn_norm=self._dense(file, p + "post_attention_norm.weight"),
            router=self._dense(file, p + "ffn_gate_inp.weight"),
            router_bias=self._dense(file, p + "ffn_gate_inp.bias"),
            gate_bias=bias["gate"], up_bias=bias["up"], down_bias=bias["down"],
        )

    def _attention(self, i: int, lw: GptOssLayerWeights, x: torch.Tensor, batch: BatchInput,
                   kv: KVCache, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        cfg = self.config
        T = x.shape[0]
        q = self.rope(lw.wq(x).view(T, cfg.n_heads, cfg.head_dim), rope)  # [T, H, hd]
        k = self.rope(lw.wk(x).view(T, cfg.n_kv_heads, cfg.head_dim), rope)  # [T, KV, hd]
        v = lw.wv(x).view(T, cfg.n_kv_heads, cfg.head_dim)
        out = torch.empty(T, cfg.n_heads, cfg.head_dim, dtype=x.dtype, device=x.device)
        for seg in batch.segments:
            rows = slice(seg.offset, seg.offset + seg.n_new)
            kv.write(i, seg.new_slots, k[rows], v[rows])
            context = seg.context_slots
            if lw.window is not None:  # read only the keys some new token can still see
                context = _last(context, lw.window + seg.n_new - 1)
            out[rows] = attend_with_sinks(q[rows], *kv.read(i, context), lw.sinks, lw.window)
        return lw.wo(out.view(T, -1))

    def route(self, lw: GptOssLayerWeights, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k expert ids [T, k] by the biased router logits, weights a softmax over those k."""
        logits = F.linear(x, lw.router, lw.router_bias).float()
        top, ids = logits.topk(self.config.n_experts_used, dim=-1)
        return ids, torch.softmax(top, dim=-1)

    def _ffn(self, i: int, lw: GptOssLayerWeights, x: torch.Tensor) -> torch.Tensor:
        return self._moe(i, lw, x)  # every gpt-oss layer has experts

    def _moe(self, i: int, lw: GptOssLayerWeights, x: torch.Tensor) -> torch.Tensor:
        ids, weights, tokens = self._routed(i, lw, x)
        plan = self.experts.plan(i, tokens)
        per_k = torch.zeros(*ids.shape, x.shape[1], dtype=x.dtype, device=x.device)  # [T, k, D]
        self._experts_into(per_k, lw, x, ids, weights, self.experts.load(i, plan.device))
        if plan.cpu:  # misses the hybrid policy keeps on the host: same FFN, host tensors
            start = perf_counter()
            host = torch.zeros(per_k.shape, dtype=torch.float32)
            self._experts_into(host, lw, x.cpu().float(), ids.cpu(), weights.cpu(), plan.cpu)
            per_k += host.to(per_k.device, per_k.dtype)
            self.experts.record_cpu(i, {e: tokens[e] for e in plan.cpu_ids}, perf_counter() - start)
        # each (token, k) result has its own row, summed in a fixed order: the result does
        # not depend on where or in what order experts ran
        return per_k.sum(1)

    def _experts_into(self, per_k: torch.Tensor, lw: GptOssLayerWeights, x: torch.Tensor, ids: torch.Tensor,
                      weights: torch.Tensor, experts) -> None:
        """Fill the (token, k) rows of per_k routed to `experts` ((id, ExpertWeights) pairs)."""
        for e, w in experts:
            tok, kth = (ids == e).nonzero(as_tuple=True)
            y = self._expert_ffn(lw, e, x[tok], w)
            per_k[tok, kth] = (y * weights[tok, kth, None].to(y.dtype)).to(per_k.dtype)

    def _expert_ffn(self, lw: GptOssLayerWeights, e: int, x: torch.Tensor, w: ExpertWeights) -> torch.Tensor:
        lay, backend = w.layout, self.kernel_backend
        dev = x.device
        gate = qmatmul(x, w.gate, lay.gate.qtype, lay.gate.shape, backend=backend) + lw.gate_bias[e].to(dev, x.dtype)
        up = qmatmul(x, w.up, lay.up.qtype, lay.up.shape, backend=backend) + lw.up_bias[e].to(dev, x.dtype)
        act = clamped_swiglu(gate, up)
        return qmatmul(act, w.down, lay.down.qtype, lay.down.shape, backend=backend) + lw.down_bias[e].to(dev, x.dtype)
