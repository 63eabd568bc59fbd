"""Paged KV cache: a pool of fixed-size blocks shared by all sequences.

A sequence holds a list of blocks (its block table); token at position p lives in slot
`block_table[p // block_size] * block_size + p % block_size`. Admission asks
`can_allocate` before `allocate`, so a request that would not fit waits instead of failing.
Which blocks are free, shared or cached for reuse by a later prompt is the BlockPool's
business (engine/block_pool.py); this class owns the storage.

Reads and writes take a `SlotIndex`: a slice when the slots are one consecutive run, so a
read is a view and a write a plain copy; otherwise the slot ids, gathered with index_select
(an order of magnitude faster on the CPU than advanced indexing). Blocks are handed out
lowest id first, so a lone sequence always gets consecutive blocks.

Multi-head latent attention keeps one latent per token that serves as K and V both: its
cache has `value_dim=0`, K holds the latent and rope part, and V is empty.
"""

from __future__ import annotations

import torch

from moestream.engine.block_pool import BlockPool

SlotIndex = slice | torch.Tensor  # consecutive slots, or their ids


class KVCache:
    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, num_blocks: int,
                 block_size: int = 16, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", value_dim: int | None = None,
                 prefix_cache: bool = False):
        self.block_size, self.num_blocks = block_size, num_blocks
        shape = (n_layers, num_blocks * block_size, n_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        v_dim = head_dim if value_dim is None else value_dim
        self.v = torch.zeros(shape[:-1] + (v_dim,), dtype=dtype, device=device)
        self.blocks = BlockPool(num_blocks, block_size, prefix_cache)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @property
    def num_free_blocks(self) -> int:
        return self.blocks.num_free

    @property
    def usage(self) -> float:
        """Fraction of blocks in use (0.0 idle .. 1.0 full); cached blocks nobody holds are free."""
        return 1.0 - self.blocks.num_free / self.num_blocks

    def blocks_needed(self, block_table: list[int], n_tokens: int) -> int:
        return self.blocks.blocks_needed(block_table, n_tokens)

    def can_allocate(self, block_table: list[int], n_tokens: int, reuse: list[int] = ()) -> bool:
        """Can a sequence holding `block_table` (plus the cached blocks `reuse`) grow to
        `n_tokens` tokens?"""
        return self.blocks.can_allocate(block_table, n_tokens, reuse)

    def allocate(self, block_table: list[int], n_tokens: int, reuse: list[int] = ()) -> None:
        self.blocks.allocate(block_table, n_tokens, reuse)

    def free(self, block_table: list[int]) -> None:
        self.blocks.free(block_table)

    def copy_block(self, src: int, dst: int) -> None:
        """Copy one block's K/V (every layer): a forked sequence's own copy of a partial block."""
        bs = self.block_size
        for cache in (self.k, self.v):
            cache[:, dst * bs:(dst + 1) * bs] = cache[:, src * bs:(src + 1) * bs]

    def slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        """KV slots of positions [start, end) of a sequence."""
        pos = torch.arange(start, end)
        table = torch.tensor(block_table, dtype=torch.long)
        slots = table[pos // self.block_size] * self.block_size + pos % self.block_size
        return slots.to(self.k.device)  # index_select wants its ids beside the cache

    def index(self, block_table: list[int], start: int, end: int) -> SlotIndex:
        """Positions [start, end) of a sequence as a SlotIndex: a slice when their blocks
        are consecutive, else their slot ids."""
        first = start // self.block_size
        blocks = block_table[first:(end - 1) // self.block_size + 1]
        if all(b == blocks[0] + j for j, b in enumerate(blocks)):
            base = blocks[0] * self.block_size + start - first * self.block_size
            return slice(base, base + end - start)
        return self.slots(block_table, start, end)

    def write(self, layer: int, index: SlotIndex, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[layer, index] = k.to(self.k.dtype)
        self.v[layer, index] = v.to(self.v.dtype)

    def read(self, layer: int, index: SlotIndex) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [n, KV, hd]: views of the cache for a slice, gathered copies for slot ids."""
        if isinstance(index, slice):
            return self.k[layer, index], self.v[layer, index]
        return self.k[layer].index_select(0, index), self.v[layer].index_select(0, index)
