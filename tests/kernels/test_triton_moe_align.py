"""moe_align_block_size vs a plain-Python sort-and-pad of the (token, expert) pairs."""

import pytest
import torch

from moestream.kernels.moe_align import max_padded_pairs, moe_align_block_size


def _python_align(topk_ids: list[list[int]], n_experts: int, block_m: int) -> tuple[list[int], list[int]]:
    """Pairs grouped by expert in pair order, each group padded with the sentinel; block owners."""
    pairs = [e for row in topk_ids for e in row]
    sentinel = len(pairs)
    sorted_ids: list[int] = []
    block_experts: list[int] = []
    for expert in range(n_experts):
        mine = [p for p, e in enumerate(pairs) if e == expert]
        if not mine:
            continue
        n_blocks = -(-len(mine) // block_m)
        sorted_ids += mine + [sentinel] * (n_blocks * block_m - len(mine))
        block_experts += [expert] * n_blocks
    return sorted_ids, block_experts


CASES = [  # (n_tokens, top_k, n_experts, block_m)
    (1, 2, 8, 16),  # decode: two experts with one pair each
    (7, 2, 4, 4),  # several blocks per expert
    (16, 4, 64, 16),  # most experts unused
    (33, 1, 3, 8),
]


@pytest.mark.parametrize("n_tokens, top_k, n_experts, block_m", CASES)
def test_matches_python(n_tokens: int, top_k: int, n_experts: int, block_m: int, device) -> None:
    gen = torch.Generator().manual_seed(n_tokens * 100 + n_experts)
    topk_ids = torch.stack([torch.randperm(n_experts, generator=gen)[:top_k] for _ in range(n_tokens)])
    _check(topk_ids.to(device), n_experts, block_m)


def test_every_pair_on_one_expert(device) -> None:
    _check(torch.full((10, 1), 2, dtype=torch.int32, device=device), n_experts=4, block_m=4)


def _check(topk_ids: torch.Tensor, n_experts: int, block_m: int) -> None:
    expected_ids, expected_experts = _python_align(topk_ids.tolist(), n_experts, block_m)
    got = moe_align_block_size(topk_ids, n_experts, block_m)
    total = int(got.num_tokens_post_pad.item())
    n_pairs = topk_ids.numel()
    assert got.block_m == block_m and got.n_pairs == n_pairs
    assert total == len(expected_ids)
    assert got.sorted_token_ids[:total].tolist() == expected_ids
    assert got.expert_ids[: total // block_m].tolist() == expected_experts
    # The static tail past the end: sentinels and unowned blocks, never read by the kernel.
    assert got.sorted_token_ids.numel() == max_padded_pairs(n_pairs, n_experts, block_m) >= total
    assert (got.sorted_token_ids[total:] == n_pairs).all()
    assert (got.expert_ids[total // block_m :] == -1).all()
    assert got.expert_ids.numel() * block_m == got.sorted_token_ids.numel()
