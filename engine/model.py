"""The MoE transformer forward, plain PyTorch, top to bottom.

One class serves olmoe, qwen2moe, qwen3moe and llama-with-experts (Mixtral): the
differences are data in `config.spec` (rope style, q/k norm, shared expert) and in
`config.router` (softmax or sigmoid scores, correction bias, groups, renormalising,
scaling: engine/router.py); leading dense layers (`config.n_dense_layers`) run a plain
SwiGLU instead of experts. Resident weights (attention, router, norms, shared expert,
dense FFNs, lm_head) are decoded once to floats;
routed experts stay quantized and come from an ExpertSource (host store or VRAM cache),
which the MoE layer asks for by id without knowing where they live.
"""

from __future__ import annotations

import logging
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields, is_dataclass
from time import perf_counter
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from moestream.kernels.cpu import (attends_in_place, cpu_add_rms_norm, cpu_attend_one, cpu_decode_attention,
                                   cpu_expert_ffn, cpu_moe_layer, has_compiled_attention)
from moestream.kernels.cpu.decode_model import CpuDecodeModel, DecodeEnds, DecodeLayerSpec, DecodeShape, QLinearSpec
from moestream.kernels.dispatch import qmatmul, use_triton, uses_cpu_kernel
from moestream.kernels.moe_ffn import moe_ffn
from moestream.engine.config import QKNorm, RopeStyle
from moestream.engine.kv_cache import KVCache, SlotIndex
from moestream.engine.layers import Embedding, Linear, Rope, dequantize_tensor, project_many, rms_norm
from moestream.engine.loader import GGUFModelFile
from moestream.engine.replay import RoutingReplay
from moestream.engine.router import Gating, select_experts
from moestream.offload.cache import ExpertCache
from moestream.offload.layout import ExpertWeights
from moestream.offload.source import ExpertSource, LayerPlan
from moestream.offload.store import HostExpertStore

log = logging.getLogger(__name__)

RoutingHook = Callable[[int, torch.Tensor, torch.Tensor], None]


@dataclass
class Segment:
    """One sequence's share of a flattened batch."""

    offset: int  # first row of this sequence in the batch's T rows
    n_new: int  # tokens of this sequence in this step
    new_slots: SlotIndex  # KV slots its new tokens write
    context_slots: SlotIndex  # KV slots of all its tokens so far, new ones included
    state_slot: int | None = None  # hybrid models: its RecurrentStatePool slot


@dataclass
class BatchInput:
    token_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    segments: list[Segment]
    logits_rows: torch.Tensor  # rows of T whose logits are wanted


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor
    wq: Linear
    wk: Linear
    wv: Linear
    wo: Linear
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    ffn_norm: torch.Tensor
    router: torch.Tensor | None  # [E, D]; None in a leading dense layer
    shared: tuple[Linear, Linear, Linear] | None  # gate, up, down
    shared_gate: torch.Tensor | None  # [D] sigmoid gate of the shared expert
    expert_bias: torch.Tensor | None = None  # [E] correction bias for choosing experts (exp_probs_b)
    dense_ffn: tuple[Linear, Linear, Linear] | None = None  # gate, up, down of a leading dense layer


def swiglu(w: tuple[Linear, Linear, Linear], x: torch.Tensor) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)): a shared expert or a dense layer's FFN."""
    gate, up, down = w
    return down(F.silu(gate(x)) * up(x))


def expert_ffn(x: torch.Tensor, w: ExpertWeights, backend: str) -> torch.Tensor:
    """SwiGLU of one routed expert, straight from its quantized blocks."""
    lay = w.layout
    qtypes = (lay.gate.qtype, lay.up.qtype, lay.down.qtype)
    if all(uses_cpu_kernel(q, x.device, backend) for q in qtypes):  # one compiled call for all three
        return cpu_expert_ffn(x, w.gate, w.up, w.down, qtypes, lay.gate.shape[0],
                              exact=backend == "auto").to(x.dtype)
    gate = qmatmul(x, w.gate, lay.gate.qtype, lay.gate.shape, backend=backend)
    up = qmatmul(x, w.up, lay.up.qtype, lay.up.shape, backend=backend)
    return qmatmul(F.silu(gate) * up, w.down, lay.down.qtype, lay.down.shape, backend=backend)


def _weight_bytes(item) -> int:
    """Bytes of the weights in `item`: a tensor, a Linear, or tuples and layer records of them."""
    if isinstance(item, Linear):
        return item.nbytes + (item.bias.nbytes if item.bias is not None else 0)
    if isinstance(item, torch.Tensor):
        return item.nbytes
    if isinstance(item, tuple):
        return sum(_weight_bytes(x) for x in item)
    if is_dataclass(item):
        return sum(_weight_bytes(getattr(item, f.name)) for f in fields(item))
    return 0  # None, counts and flags


def _attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention of one new token (decode) as two batched matmuls over the KV heads, where
    the compiled CPU attention does not run (CUDA, no compiler); they read the cache's strided
    views in place: scaled_dot_product_attention's general path took 25-90% longer on them in
    the CPU decode loop (OLMoE, 160 tokens of context)."""
    # q: [1, H, hd]; k, v: [ctx, KV, hd], views into the cache
    _, H, hd = q.shape
    n_kv = k.shape[1]
    q = (q * hd**-0.5).view(n_kv, H // n_kv, hd)  # [KV, group, hd]: the heads that share a KV head
    scores = torch.bmm(q, k.permute(1, 2, 0))  # [KV, group, ctx]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
    return torch.bmm(probs, v.transpose(0, 1)).view(1, H, hd)


class MoEModel:
    def __init__(self, file: GGUFModelFile, experts: ExpertSource, device: torch.device,
                 dtype: torch.dtype = torch.float32, kernel_backend: str = "auto",
                 prefetch: bool = False, progress: bool = True, dense_weights: bool = False):
        cfg = self.config = file.config
        self.experts, self.device, self.dtype = experts, device, dtype
        self.dense_weights = dense_weights
        self.kernel_backend, self.prefetch = kernel_backend, prefetch
        self.routing_hook: RoutingHook | None = None
        self._cpu_pool: ThreadPoolExecutor | None = None  # the hybrid policy's CPU side
        self.replay: RoutingReplay | None = None  # benchmarks: routes from a real log instead
        self._decoder: CpuDecodeModel | None | bool = False  # False: not built yet (_compiled_decoder)
        self.embed = Embedding(file.tensor("token_embd.weight"), dtype, device)
        self.output_norm = self._dense(file, "output_norm.weight")
        head = "output.weight" if file.has("output.weight") else "token_embd.weight"
        self.lm_head = self._linear(file, head)
        self.rope = Rope(cfg.spec.rope, cfg.rope_dims, cfg.rope_base, cfg.rope_scale, device)
        # disable=None: no bar when stderr is not a terminal, so a start-up error stays one line
        self.layers = [self._layer(file, i) for i in tqdm(range(cfg.n_layers), desc="loading layers",
                                                          unit="layer", disable=None if progress else True)]

    def _dense(self, file: GGUFModelFile, name: str) -> torch.Tensor:
        return dequantize_tensor(file.tensor(name), self.dtype, self.device)

    def _optional(self, file: GGUFModelFile, name: str) -> torch.Tensor | None:
        return self._dense(file, name) if file.has(name) else None

    def _linear(self, file: GGUFModelFile, name: str, bias: str | None = None) -> Linear:
        b = self._optional(file, bias) if bias else None
        return Linear(file.tensor(name), b, self.dtype, self.device, self.kernel_backend, self.dense_weights)

    @property
    def resident_bytes(self) -> int:
        """Bytes of the weights this model holds on its device (experts and embedding apart)."""
        return _weight_bytes((self.output_norm, self.lm_head, *self.layers))

    def _swiglu(self, file: GGUFModelFile, name: str) -> tuple[Linear, Linear, Linear]:
        """gate, up, down of a SwiGLU; `name` has "{}" where gate/up/down go."""
        return tuple(self._linear(file, name.format(n)) for n in ("gate", "up", "down"))

    def _layer(self, file: GGUFModelFile, i: int) -> LayerWeights:
        p = f"blk.{i}."
        spec = self.config.spec
        is_dense = i < self.config.n_dense_layers
        shared = None
        if spec.shared_expert and not is_dense:
            shared = self._swiglu(file, p + "ffn_{}_shexp.weight")
        q_norm = k_norm = None
        if spec.qk_norm is not QKNorm.NONE:  # required or not: arch_tensors has checked the file
            q_norm = self._optional(file, p + "attn_q_norm.weight")
            k_norm = self._optional(file, p + "attn_k_norm.weight")
        return LayerWeights(
            attn_norm=self._dense(file, p + "attn_norm.weight"),
            wq=self._linear(file, p + "attn_q.weight", p + "attn_q.bias"),
            wk=self._linear(file, p + "attn_k.weight", p + "attn_k.bias"),
            wv=self._linear(file, p + "attn_v.weight", p + "attn_v.bias"),
            wo=self._linear(file, p + "attn_output.weight"),
            q_norm=q_norm,
            k_norm=k_norm,
            ffn_norm=self._dense(file, f"{p}{spec.ffn_norm}.weight"),
            router=None if is_dense else self._dense(file, p + "ffn_gate_inp.weight"),
            shared=shared,
            shared_gate=None if is_dense else self._optional(file, p + "ffn_gate_inp_shexp.weight"),
            expert_bias=None if is_dense else self._optional(file, p + "exp_probs_b.bias"),
            dense_ffn=self._swiglu(file, p + "ffn_{}.weight") if is_dense else None,
        )

    @torch.inference_mode()
    def forward(self, batch: BatchInput, kv: KVCache) -> torch.Tensor:
        """Logits [len(batch.logits_rows), vocab] (float32) for the rows asked for."""
        if batch.token_ids.shape[0] == 1 and self._decodes_compiled(batch, kv):
            return self._compiled_decode(batch, kv)
        h = self.embed(batch.token_ids)  # [T, D]
        rope = self.rope.tables(batch.positions)
        ffn_out = None  # the previous layer's, added to h together with the next norm
        for i, layer in enumerate(self.layers):
            h, x = self._add_norm(h, ffn_out, layer.attn_norm)
            h, x = self._add_norm(h, self._attention(i, layer, x, batch, kv, rope), layer.ffn_norm)
            ffn_out = self._ffn(i, layer, x)
            if self.prefetch and i + 1 < len(self.layers):
                self._prefetch(i + 1, h + ffn_out)
        h = h + ffn_out
        h = rms_norm(h[batch.logits_rows], self.output_norm, self.config.rms_eps)
        return self.lm_head(h).float()

    def _decodes_compiled(self, batch: BatchInput, kv: KVCache) -> bool:
        """Whether this one-token step runs every layer in one compiled call (CpuDecodeModel):
        a model it covers (_compiled_decoder), the fused attention's conditions, and no
        replayed routing or routing hook (they take each layer's routing in Python)."""
        if self.replay is not None or self.routing_hook is not None or len(batch.segments) != 1:
            return False
        if kv.v.shape[-1] != kv.k.shape[-1] or not kv.k.is_contiguous() or not kv.v.is_contiguous():
            return False
        if self.device.type != "cpu" or self.dtype != torch.float32 or kv.k.dtype not in (torch.float32, torch.float16):
            return False
        seg = batch.segments[0]
        new, context = seg.new_slots, seg.context_slots
        last = context.stop - 1 if isinstance(context, slice) else int(context[-1])
        # the context in a block table's slots (not one run) is read through their ids
        return (isinstance(new, slice) and new.stop - new.start == 1 and new.start == last
                and has_compiled_attention() and self._compiled_decoder() is not None)

    def _compiled_decoder(self) -> CpuDecodeModel | None:
        """The model's CpuDecodeModel, built at the first decode step; None where it does not
        cover the model: another device or dtype, a subclass with its own layer maths, a
        leading dense layer, a shared expert, grouped routing, experts outside a host store
        in the file's pages, or a weight without a compiled CPU kernel."""
        if self._decoder is False:
            self._decoder = self._build_decoder()
        return self._decoder

    def _build_decoder(self) -> CpuDecodeModel | None:
        cfg = self.config
        if (type(self) is not MoEModel or self.device.type != "cpu" or self.dtype != torch.float32
                or not has_compiled_attention() or not isinstance(self.experts, HostExpertStore)
                or cfg.router.n_groups != 1 or cfg.n_experts_used > cfg.n_experts):
            return None
        specs = []
        for i, lw in enumerate(self.layers):
            arrays = self.experts.part_arrays(i) if i in self.experts.layers else None
            linears = (lw.wq, lw.wk, lw.wv, lw.wo)
            if (arrays is None or lw.router is None or lw.shared is not None or lw.dense_ffn is not None
                    or lw.router.dtype != torch.float32
                    or not all(lin.weight is None and uses_cpu_kernel(lin.qtype, self.device, lin.backend)
                               for lin in linears)):
                return None
            lay = self.experts.layout(i)
            types = (lay.gate.qtype, lay.up.qtype, lay.down.qtype)
            if not all(uses_cpu_kernel(t, self.device, self.kernel_backend) for t in types):
                return None
            q, k, v, o = (QLinearSpec(lin.raw, lin.qtype, *lin.shape, lin.bias) for lin in linears)
            specs.append(DecodeLayerSpec(lw.attn_norm.contiguous(), lw.ffn_norm.contiguous(), q, k, v, o,
                                         lw.q_norm, lw.k_norm, lw.router.contiguous(), lw.expert_bias, *arrays, types))
        exact = self.kernel_backend == "auto"
        shape = DecodeShape(cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, self.experts.layout(0).gate.shape[0],
                            cfg.n_experts_used, cfg.rms_eps, cfg.spec.qk_norm is not QKNorm.FULL, cfg.rope_dims,
                            self.rope.style is RopeStyle.NEOX, exact, exact,
                            cfg.router.gating is Gating.SIGMOID, cfg.router.norm_topk, cfg.router.weights_scale)
        head = self.lm_head
        ends = DecodeEnds(self.rope.inv_freq, self.rope.scale)
        if head.weight is None and uses_cpu_kernel(head.qtype, self.device, head.backend) and head.bias is None:
            ends = DecodeEnds(self.rope.inv_freq, self.rope.scale, self.output_norm.contiguous(),
                              QLinearSpec(head.raw, head.qtype, *head.shape))
        try:
            return CpuDecodeModel(specs, shape, ends)
        except (ValueError, RuntimeError) as error:  # a layout it does not take: the per-call path
            log.info("decode runs layer by layer in Python: %s", error)
            return None

    def _compiled_decode(self, batch: BatchInput, kv: KVCache) -> torch.Tensor:
        """One decode token through every layer in one compiled call (_compiled_decoder)."""
        decoder = self._decoder
        out, ids, _ = decoder.run(self.embed(batch.token_ids), kv.k, kv.v, batch.segments[0].context_slots,
                                  int(batch.positions[0]))
        self.experts.count_lookups(ids)
        if decoder.vocab:  # the lm_head ran in the call
            return out[batch.logits_rows]
        h = rms_norm(out[batch.logits_rows], self.output_norm, self.config.rms_eps)
        return self.lm_head(h).float()

    def _add_norm(self, h: torch.Tensor, delta: torch.Tensor | None,
                  weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h + delta (h when delta is None) and its RMSNorm: one compiled call on the CPU in
        fp32 (two to eight torch ops otherwise, each slow to dispatch right after a kernel)."""
        if h.device.type == "cpu" and h.dtype == torch.float32 and has_compiled_attention():
            return cpu_add_rms_norm(h, delta, weight, self.config.rms_eps)
        if delta is not None:
            h = h + delta
        return h, rms_norm(h, weight, self.config.rms_eps)

    def _attention(self, i: int, lw: LayerWeights, x: torch.Tensor, batch: BatchInput,
                   kv: KVCache, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        cfg = self.config
        T = x.shape[0]
        q, k, v = project_many((lw.wq, lw.wk, lw.wv), x)
        if self._fused_decode(x, batch, kv):
            return lw.wo(self._decode_attention(i, lw, q, k, v, batch.segments[0], kv, rope).view(1, -1))
        if cfg.spec.qk_norm is QKNorm.FULL:
            q, k = rms_norm(q, lw.q_norm, cfg.rms_eps), rms_norm(k, lw.k_norm, cfg.rms_eps)
        q = q.view(T, cfg.n_heads, cfg.head_dim)  # [T, H, hd]
        k = k.view(T, cfg.n_kv_heads, cfg.head_dim)  # [T, KV, hd]
        v = v.view(T, cfg.n_kv_heads, cfg.head_dim)
        if cfg.spec.qk_norm is not QKNorm.FULL and lw.q_norm is not None:  # per head
            q, k = rms_norm(q, lw.q_norm, cfg.rms_eps), rms_norm(k, lw.k_norm, cfg.rms_eps)
        q, k = self.rope(q, rope), self.rope(k, rope)
        out = torch.empty(T, cfg.n_heads, cfg.head_dim, dtype=x.dtype, device=x.device)
        for seg in batch.segments:
            rows = slice(seg.offset, seg.offset + seg.n_new)
            kv.write(i, seg.new_slots, k[rows], v[rows])
            out[rows] = self._attend(q[rows], *kv.read(i, seg.context_slots))
        return lw.wo(out.view(T, -1))

    def _fused_decode(self, x: torch.Tensor, batch: BatchInput, kv: KVCache) -> bool:
        """Whether a step's attention runs as one compiled call (cpu_decode_attention): one
        token of one sequence, fp32 on the CPU, its KV slots one run in an fp32 or fp16 cache."""
        if x.shape[0] != 1 or x.device.type != "cpu" or x.dtype != torch.float32:
            return False
        if kv.k.dtype not in (torch.float32, torch.float16):
            return False
        seg = batch.segments[0]
        new, context = seg.new_slots, seg.context_slots
        return (isinstance(new, slice) and isinstance(context, slice) and new.start == context.stop - 1
                and has_compiled_attention())

    def _decode_attention(self, i: int, lw: LayerWeights, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          seg: Segment, kv: KVCache, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """[1, H, hd]: q/k norm, rope, the KV cache write and the attention of one token in
        one compiled call, in place of ~25 small torch ops (their dispatch, cold after the
        expert kernels, was most of a decode token's time outside the matmuls)."""
        cfg = self.config
        qk_norm = None
        if lw.q_norm is not None:
            qk_norm = (lw.q_norm, lw.k_norm, cfg.spec.qk_norm is not QKNorm.FULL)
        k_ctx, v_ctx = kv.read(i, seg.context_slots)
        shape = (1, -1, cfg.head_dim)
        return cpu_decode_attention(q.view(shape), k.view(shape), v.view(shape), k_ctx, v_ctx, rope,
                                    self.rope.style is RopeStyle.NEOX, qk_norm, cfg.rms_eps)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: [n, H, hd] (the last n positions); k, v: [ctx, KV, hd], stored in the KV dtype,
        # computed in q's
        k, v = k.to(q.dtype), v.to(q.dtype)
        n, ctx = q.shape[0], k.shape[0]
        if n == 1:
            return cpu_attend_one(q, k, v) if attends_in_place(q, k, v) else _attend_one(q, k, v)
        qpos = torch.arange(ctx - n, ctx, device=q.device)[:, None]
        mask = torch.arange(ctx, device=q.device)[None, :] <= qpos  # [n, ctx]
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, enable_gqa=True
        )  # [H, n, hd]
        return out.transpose(0, 1)

    def route(self, lw: LayerWeights, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k expert ids [T, k] and their weights [T, k] (float32), as the file's router
        chooses them (config.router)."""
        return select_experts(F.linear(x, lw.router), lw.expert_bias, self.config.router)

    def _ffn(self, i: int, lw: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        """The FFN half of layer i: a leading dense layer's SwiGLU, else routed + shared experts."""
        return swiglu(lw.dense_ffn, x) if lw.dense_ffn is not None else self._moe(i, lw, x)

    def _routed(self, i: int, lw: LayerWeights, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[int, int]]:
        """Layer i's routing (the router, or a replayed log), shown to the routing hook:
        ids [T, k], weights [T, k] and expert -> tokens routed to it, lowest id first."""
        if self.replay is not None:
            ids, weights = self.replay.route(i, x.shape[0], x.device)
        else:
            ids, weights = self.route(lw, x)
        if self.routing_hook is not None:
            self.routing_hook(i, ids, weights)
        # a decode step has k ids: counting them in Python is cheaper than a bincount over every expert
        return ids, weights, dict(sorted(Counter(ids.flatten().tolist()).items()))

    def _moe(self, i: int, lw: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        ids, weights, tokens = self._routed(i, lw, x)
        plan = self.experts.plan(i, tokens)
        # The CPU side (misses not worth a copy) starts first and runs while the device side
        # computes hits and copies; its rows are filled in when it is done.
        cpu_side = self._start_cpu_side(x, ids, weights, plan) if plan.cpu else None
        per_k = self._device_side(i, x, ids, weights, plan.device)
        if cpu_side is not None:
            (tok, kth), y, seconds = cpu_side.result()
            per_k[tok.to(per_k.device), kth.to(per_k.device)] = y.to(per_k.device, per_k.dtype)
            self.experts.record_cpu(i, {e: tokens[e] for e in plan.cpu_ids}, seconds)
        # Each (token, k) result lands in its own row and the k rows are summed in a fixed
        # order, so the result does not depend on where or in what order experts ran.
        out = per_k.sum(1)
        if lw.shared is not None:
            s = swiglu(lw.shared, x)
            if lw.shared_gate is not None:
                s = s * torch.sigmoid(F.linear(x, lw.shared_gate.view(1, -1)))
            out = out + s
        return out

    def _device_side(self, i: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                     expert_ids: tuple[int, ...]) -> torch.Tensor:
        """per_k [T, k, D]: the rows of `expert_ids`, computed where the source keeps them
        (zeros elsewhere)."""
        T, D = x.shape
        if isinstance(self.experts, ExpertCache):
            lay = self.experts.store.layout(i)
            if all(use_triton(p.qtype, x.device, self.kernel_backend) for p in (lay.gate, lay.up, lay.down)):
                return self._grouped_device_side(i, x, ids, weights, expert_ids)
        experts = self.experts.load(i, expert_ids)
        lay = self.experts.layout(i) if isinstance(self.experts, HostExpertStore) else None
        parts = (lay.gate, lay.up, lay.down) if lay is not None else ()
        if parts and x.dtype == torch.float32 and all(uses_cpu_kernel(p.qtype, x.device, self.kernel_backend)
                                                        for p in parts):
            # Host-store experts stay valid after the generator moves on (a cache slot would
            # not), so the whole layer runs in one compiled call, bitwise as expert by expert.
            qtypes = tuple(p.qtype for p in parts)
            return cpu_moe_layer(x, ids, weights, [(e, *w.parts) for e, w in experts], qtypes,
                                 lay.gate.shape[0], exact=self.kernel_backend == "auto")
        per_k = torch.zeros(T, ids.shape[1], D, dtype=x.dtype, device=x.device)
        for e, w in experts:
            tok, kth = (ids == e).nonzero(as_tuple=True)
            y = expert_ffn(x[tok], w, self.kernel_backend)
            per_k[tok, kth] = y * weights[tok, kth, None].to(y.dtype)
        return per_k

    def _grouped_device_side(self, i: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                             expert_ids: tuple[int, ...]) -> torch.Tensor:
        """per_k [T, k, D] from the cache slots, one grouped Triton FFN (kernels.moe_ffn) per
        group the cache hands out: the hits, then each wave of copies."""
        T, D = x.shape
        cache = self.experts
        layout = cache.store.layout(i).slot_layout()
        ids_host = ids.cpu()  # the routing already came to the host to plan this step
        per_k = torch.zeros(T, ids.shape[1], D, dtype=x.dtype, device=x.device)
        for group in cache.load_groups(i, expert_ids):
            slot_of_expert = torch.zeros(self.config.n_experts, dtype=torch.int32)
            for expert, slot in group:
                slot_of_expert[expert] = slot
            members = torch.tensor([e for e, _ in group])
            tok, kth = torch.isin(ids_host, members).nonzero(as_tuple=True)
            tok, kth = tok.to(x.device), kth.to(x.device)
            # one row per (token, k) pair of this group, each its own top-1 "token"
            y = moe_ffn(x[tok], cache.buffer, slot_of_expert.to(x.device), layout, ids[tok, kth, None],
                        weights[tok, kth, None].to(torch.float32).contiguous(), backend=self.kernel_backend)
            per_k[tok, kth] = y
        return per_k

    def _start_cpu_side(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                        plan: LayerPlan) -> Future:
        """Compute the plan's CPU experts from host memory on a worker thread (the compiled
        kernels release the GIL). Inputs come to the host here, before the device side is
        queued, so the worker never waits on device work queued after them."""
        if self._cpu_pool is None:
            self._cpu_pool = ThreadPoolExecutor(1, thread_name_prefix="moestream-cpu-experts")
        x_host, ids_host, weights_host = x.cpu(), ids.cpu(), weights.cpu()
        return self._cpu_pool.submit(self._cpu_experts, x_host, ids_host, weights_host, plan.cpu)

    @torch.inference_mode()
    def _cpu_experts(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                     experts: tuple[tuple[int, ExpertWeights], ...]):
        """((tok, kth), y [n, D] float32, seconds) for the (token, k) pairs routed to `experts`."""
        start = perf_counter()
        tok, kth = torch.isin(ids, torch.tensor([e for e, _ in experts])).nonzero(as_tuple=True)
        lay = experts[0][1].layout
        qtypes = (lay.gate.qtype, lay.up.qtype, lay.down.qtype)
        # one row per (token, k) pair, so each expert sees exactly its tokens' rows
        y = cpu_moe_layer(x[tok], ids[tok, kth, None], weights[tok, kth, None],
                          [(e, *w.parts) for e, w in experts], qtypes, lay.gate.shape[0],
                          exact=self.kernel_backend != "q8")  # int8 activations only when asked
        return (tok, kth), y[:, 0], perf_counter() - start

    def _prefetch(self, i: int, h: torch.Tensor) -> None:
        """Guess layer i's experts from the current hidden state and start their copies."""
        lw = self.layers[i]
        if lw.router is None:  # a dense layer: no experts to bring in
            return
        ids, _ = self.route(lw, rms_norm(h, lw.ffn_norm, self.config.rms_eps))
        self.experts.prefetch(i, ids.unique().tolist())
