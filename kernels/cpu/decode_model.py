"""A decode token through every layer of a MoE transformer in one compiled call (CPU).

`CpuDecodeModel` holds the addresses of a model's weights (checked once, here) and runs one
token's layers (norms, q/k/v, the fused attention over the KV cache, the output projection,
the router and the routed experts: csrc/decode_model.h) without returning to Python between
them. Python's part of a decode token was ~40 calls a layer, each slow to dispatch right
after a kernel had swept the caches: 7-8 ms of a 32 ms OLMoE token on two threads
(docs/PERFORMANCE.md). The kernels are the ones the per-call path uses, on the same
activation rows; the router's logits and softmax are summed in another order than torch's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from gguf import GGMLQuantizationType

from moestream.kernels.cpu.build import load_extension
from moestream.kernels.cpu.qmatmul import has_cpu_kernel
from moestream.kernels.formats import row_bytes

# The parts the compiled call times when asked (csrc/decode_model.h: DecodePart), in order.
PARTS = ("norms", "q/k/v", "attention", "output projection", "router", "experts", "lm_head")


@dataclass(frozen=True)
class QLinearSpec:
    """W [rows, cols] as GGUF blocks (uint8, contiguous) and an optional float32 bias [rows]."""

    raw: torch.Tensor
    qtype: GGMLQuantizationType
    rows: int
    cols: int
    bias: torch.Tensor | None = None


@dataclass(frozen=True)
class DecodeLayerSpec:
    attn_norm: torch.Tensor  # [D] float32
    ffn_norm: torch.Tensor
    q: QLinearSpec
    k: QLinearSpec
    v: QLinearSpec
    o: QLinearSpec
    q_norm: torch.Tensor | None  # [H * hd] (over all heads) or [hd] (per head), float32
    k_norm: torch.Tensor | None
    router: torch.Tensor  # [E, D] float32
    router_bias: torch.Tensor | None  # [E]: added to choose experts, not to weight them
    gate: torch.Tensor  # [E, bytes of one expert's gate] uint8, rows contiguous
    up: torch.Tensor
    down: torch.Tensor
    expert_types: tuple[GGMLQuantizationType, GGMLQuantizationType, GGMLQuantizationType]  # gate, up, down


@dataclass(frozen=True)
class DecodeShape:
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int  # routed experts' hidden width
    top_k: int
    eps: float
    qk_norm_per_head: bool
    rope_dims: int
    neox: bool
    exact_linear: bool  # fp32 route for the attention projections (else int8 activations)
    exact_experts: bool
    sigmoid: bool  # gating; else softmax
    norm_topk: bool
    weights_scale: float = 1.0


@dataclass(frozen=True)
class DecodeEnds:
    """What comes before and after the layers: the rope frequencies [rope_dims / 2] (float64)
    and linear position scale (angle = position * scale * inv_freq, as engine/layers.py's
    Rope), and optionally the output norm [D] and lm_head (then `run` returns logits)."""

    inv_freq: torch.Tensor
    rope_scale: float = 1.0
    output_norm: torch.Tensor | None = None
    lm_head: QLinearSpec | None = None


def _f32(t: torch.Tensor | None, numel: int | tuple[int, ...], what: str) -> int:
    if t is None:
        return 0
    sizes = numel if isinstance(numel, tuple) else (numel,)
    if t.dtype != torch.float32 or not t.is_contiguous() or t.device.type != "cpu" or t.numel() not in sizes:
        raise ValueError(f"{what}: expected a contiguous float32 CPU tensor of {' or '.join(map(str, sizes))} "
                         f"values, got {t.dtype} {tuple(t.shape)} on {t.device}")
    return t.data_ptr()


def _linear(spec: QLinearSpec, cols: int, what: str) -> list[int]:
    raw = spec.raw
    want = spec.rows * row_bytes(spec.qtype, cols)
    if (spec.cols != cols or raw.dtype != torch.uint8 or not raw.is_contiguous() or raw.device.type != "cpu"
            or raw.numel() != want or not has_cpu_kernel(spec.qtype)):
        raise ValueError(f"{what}: expected {want} contiguous uint8 CPU bytes of a {spec.qtype.name} [{spec.rows}, "
                         f"{cols}] with a compiled kernel, got {raw.numel()} {raw.dtype} [.., {spec.cols}]")
    return [raw.data_ptr(), int(spec.qtype), spec.rows, _f32(spec.bias, spec.rows, what + " bias")]


def _experts(part: torch.Tensor, n_experts: int, nbytes: int, what: str) -> tuple[int, int]:
    if (part.dtype != torch.uint8 or part.dim() != 2 or part.shape != (n_experts, nbytes) or part.stride(1) != 1
            or part.device.type != "cpu"):
        raise ValueError(f"{what}: expected uint8 CPU [{n_experts}, {nbytes}] with contiguous rows, "
                         f"got {part.dtype} {tuple(part.shape)} stride {part.stride()}")
    return part.data_ptr(), part.stride(0)


class CpuDecodeModel:
    """One decode token through all layers in one call; see the module's text."""

    # When True (`moestream bench --profile` sets it), each run times its parts (PARTS) into
    # `last_seconds`: a few clock reads a layer.
    timing = False

    def __init__(self, layers: list[DecodeLayerSpec], shape: DecodeShape, ends: DecodeEnds):
        ext = load_extension()
        if ext is None or not hasattr(ext, "DecodeModel"):
            raise RuntimeError("the compiled CPU kernels are not available")
        s = shape
        D = layers[0].attn_norm.numel()
        E = layers[0].router.shape[0]
        q_dim, kv_dim = s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim
        if s.rope_dims > s.head_dim or s.rope_dims % 2 or not 1 <= s.top_k <= E:
            raise ValueError(f"rope over {s.rope_dims} of {s.head_dim} dims, top-{s.top_k} of {E}: not runnable")
        norm_sizes = (s.head_dim,) if s.qk_norm_per_head else (q_dim,)
        k_norm_sizes = (s.head_dim,) if s.qk_norm_per_head else (kv_dim,)
        fields = []
        for i, L in enumerate(layers):
            p = f"layer {i}"
            if (L.q_norm is None) != (L.k_norm is None):
                raise ValueError(f"{p}: a q norm without a k norm, or the other way round")
            row = [_f32(L.attn_norm, D, p + " attn_norm"), _f32(L.ffn_norm, D, p + " ffn_norm")]
            row += _linear(L.q, D, p + " q") + _linear(L.k, D, p + " k") + _linear(L.v, D, p + " v")
            row += _linear(L.o, q_dim, p + " output")
            if (L.q.rows, L.k.rows, L.v.rows, L.o.rows) != (q_dim, kv_dim, kv_dim, D):
                raise ValueError(f"{p}: q/k/v/o rows {(L.q.rows, L.k.rows, L.v.rows, L.o.rows)} do not fit "
                                 f"{s.n_heads} heads, {s.n_kv_heads} KV heads of {s.head_dim}, width {D}")
            row += [_f32(L.q_norm, norm_sizes, p + " q_norm"), _f32(L.k_norm, k_norm_sizes, p + " k_norm")]
            row += [_f32(L.router, E * D, p + " router"), _f32(L.router_bias, E, p + " router bias")]
            gate_t, up_t, down_t = L.expert_types
            if not all(has_cpu_kernel(t) for t in L.expert_types):
                raise ValueError(f"{p}: expert types {[t.name for t in L.expert_types]}: not all have a compiled kernel")
            parts = [_experts(L.gate, E, s.intermediate * row_bytes(gate_t, D), p + " gate"),
                     _experts(L.up, E, s.intermediate * row_bytes(up_t, D), p + " up"),
                     _experts(L.down, E, D * row_bytes(down_t, s.intermediate), p + " down")]
            row += [ptr for ptr, _ in parts] + [stride for _, stride in parts] + [int(t) for t in L.expert_types]
            fields.append(row)
        if ends.inv_freq.numel() != s.rope_dims // 2:
            raise ValueError(f"rope: {ends.inv_freq.numel()} frequencies for {s.rope_dims} dims")
        head, output_norm = [0, 0, 0, 0], 0
        if ends.lm_head is not None:
            output_norm = _f32(ends.output_norm, D, "output norm")
            head = _linear(ends.lm_head, D, "lm_head")
        self._keep = (layers, ends)  # the addresses above point into these tensors
        self.shape, self.n_layers, self.d_model, self.n_experts = shape, len(layers), D, E
        self.vocab = ends.lm_head.rows if ends.lm_head is not None else 0
        dims = [D, s.n_heads, s.n_kv_heads, s.head_dim, s.intermediate, E, s.top_k, s.rope_dims]
        flags = [s.qk_norm_per_head, s.neox, s.exact_linear, s.exact_experts, s.sigmoid, s.norm_topk]
        self._model = ext.DecodeModel(dims, flags, s.eps, s.weights_scale, fields)
        self._model.set_ends(ends.inv_freq.double().tolist(), float(ends.rope_scale),
                             output_norm, head[0], head[1], self.vocab)
        self.last_seconds: dict[str, float] = {}

    def run(self, h: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, context: slice | torch.Tensor,
            position: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(out, ids [L, k], weights [L, k]) for one token's embedding h [1, D] at `position`:
        out is the logits [1, vocab] when the model has an lm_head (DecodeEnds), else h after
        every layer [1, D] (before the output norm); ids and weights are each layer's routing.
        k_cache / v_cache [L, slots, KV, hd] (fp32 or fp16, contiguous); `context`: the cache
        slots of the sequence's tokens in order (a slice, or int64 slot ids as a block table
        gives them), the token's own the last, where its k and v are written."""
        s = self.shape
        L, D = self.n_layers, self.d_model
        n_slots = k_cache.shape[1] if k_cache.dim() == 4 else 0
        if isinstance(context, slice):
            slot0, ctx, slot_ids = context.start, context.stop - context.start, None
            slots_ok = 0 <= slot0 and slot0 + ctx <= n_slots
        else:
            slot_ids = context.to(torch.int64).contiguous()
            slot0, ctx = 0, slot_ids.numel()
            slots_ok = (slot_ids.dim() == 1 and slot_ids.device.type == "cpu"
                        and ctx > 0 and 0 <= int(slot_ids.min()) and int(slot_ids.max()) < n_slots)
        if not (slots_ok and ctx >= 1 and k_cache.dtype in (torch.float32, torch.float16)
                and v_cache.dtype == k_cache.dtype and k_cache.shape == v_cache.shape and k_cache.dim() == 4
                and k_cache.shape[0] == L and k_cache.shape[2:] == (s.n_kv_heads, s.head_dim)
                and k_cache.is_contiguous() and v_cache.is_contiguous() and h.shape == (1, D)
                and h.dtype == torch.float32 and k_cache.device.type == "cpu"):
            raise ValueError("CpuDecodeModel.run needs h [1, D] float32, contiguous CPU KV caches "
                             "[L, slots, KV, hd] and the context's slots inside them")
        h = h.contiguous().clone()
        ids = torch.empty(L, s.top_k, dtype=torch.int64)
        weights = torch.empty(L, s.top_k)
        logits = torch.empty(1, self.vocab) if self.vocab else None
        seconds = torch.zeros(len(PARTS), dtype=torch.float64) if self.timing else None
        self._model.run(h.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), k_cache.dtype == torch.float16,
                        k_cache.stride(0), k_cache.stride(1), slot0, ctx, int(position),
                        0 if slot_ids is None else slot_ids.data_ptr(), ids.data_ptr(), weights.data_ptr(),
                        0 if logits is None else logits.data_ptr(), 0 if seconds is None else seconds.data_ptr())
        if seconds is not None:
            self.last_seconds = dict(zip(PARTS, seconds.tolist()))
        return (h if logits is None else logits), ids, weights
