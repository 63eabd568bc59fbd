"""The routed-expert FFN of one MoE layer, reading every expert from its cache slot.

y[t] = sum_j w[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t])),  e = topk_ids[t, j]

(the SwiGLU expert of OLMoE, Qwen-MoE, Mixtral and DeepSeek). The pairs are sorted by
expert once and the schedule is reused by every projection; gate and up run as one
[2I, D] matmul when they sit back to back in the slot with one type; the routed weights
are applied in the down projection's epilogue.
"""

import torch
import torch.nn.functional as F

from moestream.kernels.expert_layout import SlotLayout
from moestream.kernels.moe_align import moe_align_block_size
from moestream.kernels.dispatch import Backend, grouped_qmatmul, use_triton


def moe_ffn(
    x: torch.Tensor, slot_buffer: torch.Tensor, slot_of_expert: torch.Tensor, layout: SlotLayout,
    topk_ids: torch.Tensor, topk_weights: torch.Tensor, backend: Backend = "auto",
) -> torch.Tensor:
    """x [T, D] -> [T, D] in x.dtype; arguments as in kernels.dispatch.grouped_qmatmul."""
    n_tokens, top_k = topk_ids.shape
    n_experts = slot_of_expert.numel()
    alignment = None  # the Triton path sorts the pairs once for all three projections
    if any(use_triton(t.qtype, x.device, backend) for t in (layout.gate, layout.up, layout.down)):
        from moestream.kernels.triton_moe import moe_block_m  # here: CPU-only installs may lack triton

        alignment = moe_align_block_size(topk_ids, n_experts, moe_block_m(topk_ids.numel(), n_experts))
    common = dict(alignment=alignment, backend=backend)
    fused = layout.fused_gate_up
    if fused is not None:
        gate, up = grouped_qmatmul(x, slot_buffer, slot_of_expert, fused, topk_ids, **common).chunk(2, dim=-1)
    else:
        gate = grouped_qmatmul(x, slot_buffer, slot_of_expert, layout.gate, topk_ids, **common)
        up = grouped_qmatmul(x, slot_buffer, slot_of_expert, layout.up, topk_ids, **common)
    inter = layout.gate.shape[0]
    hidden = (F.silu(gate.float()) * up.float()).to(x.dtype).reshape(n_tokens * top_k, inter)  # [T*k, I]
    down = grouped_qmatmul(hidden, slot_buffer, slot_of_expert, layout.down, topk_ids, topk_weights, **common)
    return down.float().sum(dim=1).to(x.dtype)  # [T, D]
