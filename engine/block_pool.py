"""Which KV blocks are free, in use or cached: reference counts and the prompt prefix cache.

A block is in use while some sequence's block table holds it (`ref_count` > 0): several may
hold it at once (a shared prompt prefix, the n choices of one request). A full block whose
K/V are computed is registered under the hash of its tokens chained with its parent's hash
(vLLM's automatic prefix caching): the hash names the whole prefix up to the block's end,
so a new sequence whose first k full blocks hash the same can take those blocks and
prefill only the rest. When its last holder lets go, a registered block stays cached
(evictable, least recently released first) until a new block is needed and none is free;
an unregistered one goes back to the free heap. Blocks in use are never evicted.

Only the bookkeeping lives here; KVCache owns the storage.
"""

from __future__ import annotations

import hashlib
import heapq
import math
from array import array
from collections import OrderedDict
from collections.abc import Sequence

BlockHash = bytes


def chain_hash(parent: BlockHash | None, tokens: Sequence[int]) -> BlockHash:
    """A collision-resistant key of a block's tokens and everything before them: a block's
    KV depends on the whole prefix, and a false hit would silently corrupt a response."""
    return hashlib.blake2b((parent or b"") + array("q", tokens).tobytes(), digest_size=16).digest()


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, caching: bool = True):
        self.num_blocks, self.block_size, self.caching = num_blocks, block_size, caching
        self.ref_count = [0] * num_blocks
        self._free: list[int] = list(range(num_blocks))  # a heap: lowest id first
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unused; LRU first
        self._block_of: dict[BlockHash, int] = {}
        self._hash_of: dict[int, BlockHash] = {}
        self.lookup_tokens = 0  # prompt tokens looked up in the cache
        self.hit_tokens = 0  # of which found cached

    # -- counts -----------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks a new allocation may take: free ones and cached ones nobody uses."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        return len(self._hash_of)

    def blocks_needed(self, block_table: list[int], n_tokens: int) -> int:
        return max(0, math.ceil(n_tokens / self.block_size) - len(block_table))

    # -- the prefix cache -------------------------------------------------------------
    def extend_hashes(self, hashes: list[BlockHash], token_ids: Sequence[int], n_tokens: int) -> None:
        """Extend `hashes` (a sequence's chained block hashes) over the full blocks of its
        first `n_tokens` tokens."""
        bs = self.block_size
        for i in range(len(hashes), n_tokens // bs):
            hashes.append(chain_hash(hashes[-1] if hashes else None, token_ids[i * bs:(i + 1) * bs]))

    def lookup(self, hashes: Sequence[BlockHash]) -> list[int]:
        """The cached blocks of the longest run of `hashes` from the first."""
        if not self.caching:
            return []
        blocks = []
        for h in hashes:
            block = self._block_of.get(h)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def register(self, block_table: list[int], hashes: Sequence[BlockHash], start: int, end: int) -> None:
        """Cache blocks [start, end) of a table, now full and computed, under their hashes.
        A block whose prefix another block already caches (two requests prefilled the same
        prompt at once) stays unregistered and is freed, not cached, when released."""
        if not self.caching:
            return
        for i in range(start, end):
            block, h = block_table[i], hashes[i]
            if block not in self._hash_of and h not in self._block_of:
                self._block_of[h], self._hash_of[block] = block, h

    def reset(self) -> None:
        """Forget every cached prefix (vLLM's reset_prefix_cache): idle cached blocks become
        free; blocks in use stay with their sequences, no longer findable."""
        for block in self._evictable:
            heapq.heappush(self._free, block)
        self._evictable.clear()
        self._block_of.clear()
        self._hash_of.clear()

    # -- allocation -------------------------------------------------------------------
    def can_allocate(self, block_table: list[int], n_tokens: int, reuse: Sequence[int] = ()) -> bool:
        """Can a table holding `block_table`, after taking the cached blocks `reuse`, grow to
        `n_tokens` tokens? Reused blocks nobody holds stop being free when taken."""
        idle = sum(1 for b in reuse if self.ref_count[b] == 0)
        need = self.blocks_needed(block_table, n_tokens) - len(reuse)
        return need <= self.num_free - idle

    def allocate(self, block_table: list[int], n_tokens: int, reuse: Sequence[int] = ()) -> None:
        """Append `reuse` (shared, counted once more), then new blocks up to `n_tokens`."""
        if not self.can_allocate(block_table, n_tokens, reuse):
            raise RuntimeError("KV cache out of blocks: call can_allocate first")
        for block in reuse:
            self.share(block)
        block_table.extend(reuse)
        block_table.extend(self._take() for _ in range(self.blocks_needed(block_table, n_tokens)))

    def share(self, block: int) -> None:
        if self.ref_count[block] == 0:
            del self._evictable[block]
        self.ref_count[block] += 1

    def free(self, block_table: list[int]) -> None:
        # Last block first: a chain's tail is useless without its head, so it goes first.
        for block in reversed(block_table):
            self.ref_count[block] -= 1
            if self.ref_count[block] > 0:
                continue
            if block in self._hash_of:
                self._evictable[block] = None
            else:
                heapq.heappush(self._free, block)
        block_table.clear()

    def _take(self) -> int:
        if self._free:
            block = heapq.heappop(self._free)
        else:
            block, _ = self._evictable.popitem(last=False)
            del self._block_of[self._hash_of.pop(block)]
        self.ref_count[block] = 1
        return block
