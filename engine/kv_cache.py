"""Paged KV cache: a pool of fixed-size blocks shared by all sequences.

A sequence owns a list of blocks (its block table); token at position p lives in slot
`block_table[p // block_size] * block_size + p % block_size`. Admission asks
`can_allocate` before `allocate`, so a request that would not fit waits instead of failing.
"""

from __future__ import annotations

import math
from collections import deque

import torch


class KVCache:
    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, num_blocks: int,
                 block_size: int = 16, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        self.block_size, self.num_blocks = block_size, num_blocks
        shape = (n_layers, num_blocks * block_size, n_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.free_blocks: deque[int] = deque(range(num_blocks))

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use (0.0 idle .. 1.0 full)."""
        return 1.0 - len(self.free_blocks) / self.num_blocks

    def blocks_needed(self, block_table: list[int], n_tokens: int) -> int:
        return max(0, math.ceil(n_tokens / self.block_size) - len(block_table))

    def can_allocate(self, block_table: list[int], n_tokens: int) -> bool:
        """Can a sequence holding `block_table` grow to `n_tokens` tokens?"""
        return self.blocks_needed(block_table, n_tokens) <= len(self.free_blocks)

    def allocate(self, block_table: list[int], n_tokens: int) -> None:
        need = self.blocks_needed(block_table, n_tokens)
        if need > len(self.free_blocks):
            raise RuntimeError("KV cache out of blocks: call can_allocate first")
        block_table.extend(self.free_blocks.popleft() for _ in range(need))

    def free(self, block_table: list[int]) -> None:
        self.free_blocks.extend(block_table)
        block_table.clear()

    def slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        """KV slots of positions [start, end) of a sequence."""
        pos = torch.arange(start, end)
        table = torch.tensor(block_table, dtype=torch.long)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def write(self, layer: int, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[layer, slot_mapping] = k.to(self.k.dtype)
        self.v[layer, slot_mapping] = v.to(self.v.dtype)

    def read(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer, slots], self.v[layer, slots]
