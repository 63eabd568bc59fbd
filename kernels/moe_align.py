"""Sort (token, expert) pairs by expert and pad each expert's run to the kernel's row block.

The grouped MoE kernel (vLLM's fused_moe pattern) gives every program BLOCK_M pairs that
share one expert. `moe_align_block_size` produces that schedule with tensor ops only, so it
runs on the GPU without a host sync: the buffers have a static worst-case length and the
kernel skips blocks at or past `num_tokens_post_pad`.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MoeAlignment:
    """Pairs sorted by expert, each expert's run padded to a multiple of `block_m`.

    A pair id p = token * top_k + k indexes the flattened topk_ids; padding holds the
    sentinel `n_pairs`.
    """

    sorted_token_ids: torch.Tensor  # int32 [max_padded]
    expert_ids: torch.Tensor  # int32 [max_padded // block_m]; -1 for blocks past the end
    num_tokens_post_pad: torch.Tensor  # int32 [1]
    block_m: int
    n_pairs: int


def max_padded_pairs(n_pairs: int, n_experts: int, block_m: int) -> int:
    """Worst case of the padded length, in whole blocks: each used expert wastes < block_m slots."""
    used_experts = min(n_experts, n_pairs)
    worst_blocks = min(-(-(n_pairs + used_experts * (block_m - 1)) // block_m),
                       -(-n_pairs // block_m) + used_experts)
    return worst_blocks * block_m


def moe_align_block_size(topk_ids: torch.Tensor, n_experts: int, block_m: int) -> MoeAlignment:
    """Sort the pairs of topk_ids [T, k] by expert (stable: token order within an expert).

    Expert ids must lie in [0, n_experts); they are not checked here to avoid a host sync.
    """
    device = topk_ids.device
    flat = topk_ids.reshape(-1).to(torch.int64)
    n_pairs = flat.numel()
    counts = torch.zeros(n_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    padded_start = padded_end - padded
    count_start = torch.cumsum(counts, 0) - counts

    order = torch.argsort(flat, stable=True)
    expert_of_sorted = flat[order]
    rank = torch.arange(n_pairs, device=device) - count_start[expert_of_sorted]
    max_padded = max_padded_pairs(n_pairs, n_experts, block_m)
    sorted_ids = torch.full((max_padded,), n_pairs, dtype=torch.int32, device=device)
    sorted_ids[padded_start[expert_of_sorted] + rank] = order.to(torch.int32)

    total = padded_end[-1:]
    block_start = torch.arange(0, max_padded, block_m, device=device)
    block_expert = torch.searchsorted(padded_end, block_start, right=True)
    expert_ids = torch.where(block_start < total, block_expert, -1).to(torch.int32)
    return MoeAlignment(sorted_ids, expert_ids, total.to(torch.int32), block_m, n_pairs)
