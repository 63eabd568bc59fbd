"""KV slot indexes (views for consecutive blocks, gathers otherwise) against the paging
formula written out per position, and the decode attention against attention in float64."""

import random

import pytest
import torch

from moestream.engine.kv_cache import KVCache
from moestream.engine.model import _attend_one

BLOCK = 4


def slot_of(block_table: list[int], p: int) -> int:
    return block_table[p // BLOCK] * BLOCK + p % BLOCK


@pytest.mark.parametrize("consecutive", [True, False])
def test_index_reads_and_writes_the_slots_of_the_block_table(consecutive):
    rng = random.Random(0)
    kv = KVCache(n_layers=2, n_kv_heads=2, head_dim=3, num_blocks=12, block_size=BLOCK)
    kv.k.copy_(torch.randn(kv.k.shape))
    for _ in range(50):
        table = list(range(3, 9)) if consecutive else rng.sample(range(12), 6)
        start = rng.randrange(0, 23)
        end = rng.randrange(start + 1, 24)
        index = kv.index(table, start, end)
        if consecutive:
            assert isinstance(index, slice), "consecutive blocks must read as a view"
        expected = kv.k[1, [slot_of(table, p) for p in range(start, end)]]
        assert torch.equal(kv.read(1, index)[0], expected)
        new = torch.randn(end - start, 2, 3)
        kv.write(1, index, new, new)
        for row, p in enumerate(range(start, end)):
            assert torch.equal(kv.k[1, slot_of(table, p)], new[row])


def test_a_lone_sequence_gets_consecutive_blocks_after_others_leave():
    kv = KVCache(n_layers=1, n_kv_heads=1, head_dim=2, num_blocks=8, block_size=BLOCK)
    a, b = [], []
    kv.allocate(a, 3 * BLOCK)
    kv.allocate(b, 2 * BLOCK)
    kv.free(b)
    kv.free(a)
    c = []
    for n in range(1, 6 * BLOCK + 1):  # a decode growing one token at a time
        kv.allocate(c, n)
    assert c == list(range(6))
    assert kv.index(c, 0, 6 * BLOCK) == slice(0, 6 * BLOCK)



@pytest.mark.parametrize("n_heads, n_kv_heads", [(8, 8), (8, 2)])
def test_decode_attention_matches_attention_in_float64(n_heads, n_kv_heads):
    torch.manual_seed(0)
    ctx, hd = 37, 16
    q = torch.randn(1, n_heads, hd)
    cache_k, cache_v = torch.randn(2 * ctx, n_kv_heads, hd), torch.randn(2 * ctx, n_kv_heads, hd)
    k, v = cache_k[5:5 + ctx], cache_v[5:5 + ctx]  # views into a larger cache, as kv.read gives
    got = _attend_one(q, k, v)
    group = n_heads // n_kv_heads
    for h in range(n_heads):
        kh, vh = k[:, h // group].double(), v[:, h // group].double()
        probs = torch.softmax(kh @ q[0, h].double() / hd**0.5, dim=0)
        torch.testing.assert_close(got[0, h].double(), probs @ vh, rtol=1e-5, atol=1e-6)
