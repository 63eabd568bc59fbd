"""One memory plan, made from the GGUF header before anything is allocated.

`plan_memory(header, config, budget_bytes)` is a pure function: `moestream inspect` prints
it and the Engine allocates exactly what it says: the KV pool, the resident weights (kept
quantized on CUDA unless dense weights are asked for and fit), a workspace estimate with a
margin, and as many expert slots as the rest of the budget buys.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from moestream.engine.engine_config import EngineConfig, kv_dtype_bytes
from moestream.engine.header import ModelHeader, TensorInfo
from moestream.engine.layers import keeps_quantized
from moestream.kernels.cpu import has_cpu_kernel
from moestream.kernels.errors import MoestreamError
from moestream.kernels.triton_configs import TRITON_QTYPES
from moestream.offload.planner import fit_slots, format_bytes, too_small_advice

MiB = 2**20
# torch gives each cuBLAS handle a 32 MiB workspace on sm_90 (8 MiB before Hopper) and
# cuBLASLt one of the same size: the larger figure, twice.
CUBLAS_WORKSPACE_BYTES = 2 * 32 * MiB
# The caching allocator rounds small tensors into 2 MiB segments and 1-10 MiB ones into
# 20 MiB segments, and splits freed blocks: a fixed slack plus a share of the activations.
ALLOCATOR_SLACK_BYTES = 64 * MiB
ALLOCATOR_SLACK_FRACTION = 0.10
# The residual stream, norms, routers and biases stay fp32 on every device (as llama.cpp).
ACTIVATION_DTYPE = torch.float32
ACTIVATION_BYTES = ACTIVATION_DTYPE.itemsize


@dataclass(frozen=True)
class MemoryPlan:
    device: str  # the device planned for: "cuda" or "cpu"
    budget_bytes: int | None  # None: no device budget (CPU, every expert in host memory)
    resident_bytes: int  # attention, router, norms, shared experts, lm_head
    kv_bytes: int
    kv_tokens: int  # the KV pool shared by the running sequences, whole blocks
    kv_dtype: str
    state_bytes: int  # hybrid models: the recurrent (DeltaNet) state of max_batch sequences
    max_model_len: int  # longest sequence: context size, trained context and pool, the least
    workspace_bytes: int  # the estimate below plus its margin
    workspace_parts: dict[str, int]
    slot_bytes: int  # one routed expert, quantized: gate + up + down
    n_slots: int
    n_experts_total: int
    routed_expert_bytes: int
    pinned_host_bytes: int  # what the host expert store pins (CUDA with pinning only)
    dense_weights: bool  # resident Linear weights decoded to fp16 (asked for, and they fit)
    min_budget_bytes: int  # everything fixed plus one expert slot
    fits: bool

    @property
    def fixed_bytes(self) -> int:
        return self.resident_bytes + self.kv_bytes + self.state_bytes + self.workspace_bytes

    @property
    def cache_bytes(self) -> int:
        return self.n_slots * self.slot_bytes

    @property
    def used_bytes(self) -> int:
        return self.fixed_bytes + self.cache_bytes

    @property
    def has_cache(self) -> bool:
        return self.budget_bytes is not None

    @property
    def is_all_resident(self) -> bool:
        return self.n_slots == self.n_experts_total

    def as_dict(self) -> dict:
        return {**asdict(self), "cache_bytes": self.cache_bytes, "used_bytes": self.used_bytes}

    def advice(self) -> str:
        return too_small_advice(self.budget_bytes or 0, self.resident_bytes, self.kv_bytes + self.state_bytes,
                                self.workspace_bytes, self.slot_bytes)

    def __str__(self) -> str:
        budget = "none (every expert in host memory)" if self.budget_bytes is None \
            else format_bytes(self.budget_bytes)
        where = "on a CUDA device" if self.device == "cuda" else "on the CPU"
        lines = [f"memory plan {where} (--plan-for {self.device})",
                 f"  {'budget':<18}{budget:>12}"]
        share = (f"{self.n_slots} of {self.n_experts_total} experts, "
                 f"{100 * self.n_slots / max(1, self.n_experts_total):.1f}%")
        kind = "fp16" if self.dense_weights else "kept quantized where a kernel reads the blocks"
        rows = [
            ("resident weights", self.resident_bytes, f"attention, router, norms, shared experts ({kind})"),
            ("KV cache", self.kv_bytes, f"{self.kv_tokens} tokens shared by the sequences, {self.kv_dtype}"),
            *([("recurrent state", self.state_bytes, "DeltaNet conv + state, one per batch slot, fp32")]
              if self.state_bytes else []),
            ("workspace", self.workspace_bytes, "activations, expert pairs, attention, logits, margin"),
            ("expert cache", self.cache_bytes, f"{self.n_slots} slots x {format_bytes(self.slot_bytes)} ({share})"),
        ]
        if self.budget_bytes is not None:
            rows.append(("unused", self.budget_bytes - self.used_bytes, ""))
        rows += [("minimum budget", self.min_budget_bytes, "fixed parts + one expert slot"),
                 ("pinned host", self.pinned_host_bytes, f"routed experts {format_bytes(self.routed_expert_bytes)}")]
        lines += [f"  {name:<18}{format_bytes(n):>12}  {note}".rstrip() for name, n, note in rows]
        lines.append(f"  longest sequence  {self.max_model_len} tokens")
        if not self.fits:
            lines.append(f"  DOES NOT FIT: {self.advice()}")
        return "\n".join(lines)


def kv_pool_tokens(header: ModelHeader, config: EngineConfig) -> int:
    """Tokens of the shared KV pool in whole blocks: --kv-tokens, else one context."""
    wanted = config.kv_tokens if config.kv_tokens is not None else min(config.ctx_size, header.context_length)
    return -(-wanted // config.kv_block_size) * config.kv_block_size


def kv_pool_bytes(header: ModelHeader, n_tokens: int, kv_dtype: str) -> int:
    per_token = header.n_kv_layers * header.n_kv_heads * (header.key_length + header.value_length)
    return per_token * n_tokens * kv_dtype_bytes(kv_dtype)


def is_linear(t: TensorInfo) -> bool:
    """A matrix the forward multiplies through `layers.Linear` (not a router, not experts)."""
    return (len(t.dims) == 2 and not t.is_routed_expert and "ffn_gate_inp" not in t.name
            and t.name != "token_embd.weight")


def linear_tensors(header: ModelHeader) -> list[TensorInfo]:
    tensors = [t for t in header.tensors if is_linear(t)]
    if header.tensor("output.weight") is None:  # tied lm_head: token_embd multiplies too
        tensors.append(header.tensor("token_embd.weight"))
    return tensors


def resident_bytes(header: ModelHeader, device: torch.device, backend: str, dense: bool) -> int:
    """Bytes the resident weights take on `device`: Linear weights as stored where a kernel
    reads their blocks, else decoded (fp16 on CUDA, fp32 on the CPU); every other tensor but
    the routed experts and the token embedding (looked up on the host) decoded to fp32."""
    dense_bytes = 2 if device.type == "cuda" else 4
    total = 0
    for t in linear_tensors(header):
        kept = t.is_block_quantized and keeps_quantized(t.qtype, device, backend, dense)
        total += t.nbytes if kept else t.n_elements * dense_bytes
    for t in header.tensors:
        if not (is_linear(t) or t.is_routed_expert or t.name == "token_embd.weight"):
            total += t.n_elements * ACTIVATION_BYTES
    return total


def workspace_parts(header: ModelHeader, config: EngineConfig, device: torch.device, max_model_len: int,
                    dense: bool) -> dict[str, int]:
    """Peak temporaries of one step, by kind (see docs/VRAM-PLANS.md for the reasoning)."""
    T, D, k = config.max_batched_tokens, header.d_model, max(1, header.n_experts_used)
    q_width = header.n_heads * header.key_length
    kv_width = header.n_kv_heads * (header.key_length + header.value_length)
    ffn = max([t.dims[1] for t in header.tensors if t.name.endswith("ffn_gate_exps.weight")] or [0])
    # the widest resident SwiGLU: a shared expert or a leading dense layer's FFN
    plain_ffn = max([t.dims[0] for t in header.tensors
                     if t.name.endswith(("ffn_gate_shexp.weight", ".ffn_gate.weight"))] or [0])
    parts = {
        # residual, normed input, q, k, v, attention output, the two residual adds
        "activations": T * (6 * D + 2 * q_width + kv_width) * ACTIVATION_BYTES,
        # one row per (token, expert) pair: gathered input, gate, up, product, output,
        # the per-pair results [T, k, D]; and the shared expert's (or dense FFN's) gate, up, product
        "expert_pairs": (T * k * (3 * D + 3 * ffn) + T * 3 * plain_ffn) * ACTIVATION_BYTES,
        # a prefill chunk's scores and probabilities over the context, the context's K and V
        # converted to fp32 for the matmuls, the causal mask
        "attention": (2 * header.n_heads * T * max_model_len + max_model_len * kv_width) * ACTIVATION_BYTES
                     + T * max_model_len,
        # each running sequence's logits row: logits, probabilities, the sorted copy
        "logits": 3 * config.max_batch * header.vocab_size * ACTIVATION_BYTES,
        "dequant_transient": _largest_dequant_transient(header, device, config.kernel_backend, dense),
    }
    if device.type == "cuda":
        parts["cublas"] = CUBLAS_WORKSPACE_BYTES
        parts["allocator_slack"] = ALLOCATOR_SLACK_BYTES + int(ALLOCATOR_SLACK_FRACTION * sum(parts.values()))
    return parts


def _largest_dequant_transient(header: ModelHeader, device: torch.device, backend: str, dense: bool) -> int:
    """fp32 bytes of the largest weight a matmul decodes whole per call: types without a
    kernel that reads blocks (Triton on CUDA, the compiled kernels on the CPU)."""
    def needs_decode(t: TensorInfo) -> bool:
        if device.type == "cuda" or backend == "triton":
            return t.qtype not in TRITON_QTYPES
        return backend == "torch" or not has_cpu_kernel(t.qtype)

    sizes = [t.n_elements for t in linear_tensors(header)
             if t.is_block_quantized and keeps_quantized(t.qtype, device, backend, dense) and needs_decode(t)]
    sizes += [t.n_elements // t.dims[0] for t in header.tensors  # one expert's projection
              if t.is_routed_expert and t.is_block_quantized and needs_decode(t)]
    return max(sizes or [0]) * ACTIVATION_BYTES


def plan_memory(header: ModelHeader, config: EngineConfig, budget_bytes: int | None) -> MemoryPlan:
    """The plan for `config.device` under `budget_bytes` (None: no device budget; with
    only `config.max_cached_experts`, the budget is exactly what that many slots need)."""
    device = torch.device(config.device)
    kv_tokens = kv_pool_tokens(header, config)
    max_model_len = min(config.ctx_size, header.context_length, kv_tokens)
    kv_bytes = kv_pool_bytes(header, kv_tokens, config.kv_dtype)
    state_bytes = header.recurrent_state_bytes(config.max_batch)
    routed = header.routed_expert_bytes
    slot_bytes = max(header.expert_bytes(i) for i in range(header.n_layers))
    if slot_bytes == 0:
        raise MoestreamError(f"this {header.arch} file has no routed experts (blk.N.ffn_*_exps): "
                             "moestream plans and runs Mixture-of-Experts models")
    n_experts_total = header.n_moe_layers * header.n_experts
    pinned = routed if device.type == "cuda" and config.pin_memory else 0

    def plan(dense: bool) -> MemoryPlan:
        parts = workspace_parts(header, config, device, max_model_len, dense)
        resident = resident_bytes(header, device, config.kernel_backend, dense)
        fixed = resident + kv_bytes + state_bytes + sum(parts.values())
        budget = budget_bytes
        if budget is None and config.max_cached_experts is not None:
            budget = fixed + config.max_cached_experts * slot_bytes
        n_slots = 0 if budget is None else fit_slots(budget, fixed, slot_bytes, n_experts_total,
                                                     config.max_cached_experts)
        return MemoryPlan(
            device=device.type, budget_bytes=budget, resident_bytes=resident, kv_bytes=kv_bytes,
            kv_tokens=kv_tokens, kv_dtype=config.kv_dtype, state_bytes=state_bytes, max_model_len=max_model_len,
            workspace_bytes=sum(parts.values()), workspace_parts=parts, slot_bytes=slot_bytes,
            n_slots=n_slots, n_experts_total=n_experts_total, routed_expert_bytes=routed,
            pinned_host_bytes=pinned, dense_weights=dense, min_budget_bytes=fixed + slot_bytes,
            fits=budget is None or n_slots >= 1,
        )

    if config.dense_weights and device.type == "cuda":
        dense = plan(dense=True)
        if dense.fits:
            return dense
    return plan(dense=False)
