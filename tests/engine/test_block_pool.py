"""The KV block bookkeeping: reference counts, the prefix cache's chained hashes, lookup of
the longest cached run, and LRU eviction that never takes a block in use."""

from moestream.engine.block_pool import BlockPool, chain_hash

BS = 4


def hashes_of(pool: BlockPool, tokens: list[int]) -> list[bytes]:
    hashes: list[bytes] = []
    pool.extend_hashes(hashes, tokens, len(tokens))
    return hashes


def filled(pool: BlockPool, tokens: list[int]) -> list[int]:
    """A table holding `tokens`, computed and registered (as the engine does after a step)."""
    table: list[int] = []
    pool.allocate(table, len(tokens))
    pool.register(table, hashes_of(pool, tokens), 0, len(tokens) // BS)
    return table


def test_a_hash_names_the_whole_prefix_not_the_block_alone():
    same_block = [1, 2, 3, 4]
    assert chain_hash(None, same_block) != chain_hash(chain_hash(None, [9, 9, 9, 9]), same_block)
    assert chain_hash(None, same_block) == chain_hash(None, list(same_block))


def test_lookup_returns_the_longest_cached_run_of_full_blocks():
    pool = BlockPool(8, BS)
    table = filled(pool, list(range(10)))  # two full blocks and a partial one
    first = list(table)
    pool.free(table)
    assert pool.num_free == 8, "cached blocks nobody holds count as free"
    assert pool.num_cached == 2
    other = list(range(8)) + [99] * 4  # same two blocks, a different third one
    assert pool.lookup(hashes_of(pool, other)) == first[:2]
    assert pool.lookup(hashes_of(pool, [0, 1, 2, 3, 7, 7, 7, 7])) == first[:1]
    assert pool.lookup(hashes_of(pool, [5, 1, 2, 3])) == []


def test_shared_blocks_are_counted_once_and_released_by_the_last_holder():
    pool = BlockPool(6, BS)
    a = filled(pool, list(range(8)))
    hit = pool.lookup(hashes_of(pool, list(range(8))))
    assert pool.can_allocate([], 12, hit) and not pool.can_allocate([], 4 * 7, hit)
    b: list[int] = []
    pool.allocate(b, 12, hit)
    assert b[:2] == a[:2] and pool.num_free == 6 - 3
    pool.free(a)
    assert pool.num_free == 3, "blocks b still holds are not free"
    pool.free(b)
    assert pool.num_free == 6


def test_reusing_an_idle_cached_block_takes_it_out_of_the_free_count():
    pool = BlockPool(3, BS)
    pool.free(filled(pool, list(range(8))))
    hit = pool.lookup(hashes_of(pool, list(range(8))))
    assert pool.can_allocate([], 12, hit)  # two cached blocks + one free block
    assert not pool.can_allocate([], 16, hit)


def test_eviction_takes_the_least_recently_released_and_never_a_block_in_use():
    pool = BlockPool(4, BS)
    old = filled(pool, [1] * 4)
    held = filled(pool, [2] * 4)
    recent = filled(pool, [3] * 4)
    pool.free(old)
    pool.free(list(recent))
    fresh: list[int] = []
    pool.allocate(fresh, 8)  # one free block, then one eviction
    assert pool.lookup(hashes_of(pool, [1] * 4)) == [], "the least recently released goes first"
    assert pool.lookup(hashes_of(pool, [3] * 4)) == recent
    assert pool.lookup(hashes_of(pool, [2] * 4)) == held
    pool.allocate(fresh, 12)
    assert pool.lookup(hashes_of(pool, [3] * 4)) == []
    assert held[0] not in fresh and pool.num_free == 0
    assert not pool.can_allocate(fresh, 16)


def test_a_duplicate_prefix_stays_unregistered_and_is_freed_not_cached():
    pool = BlockPool(4, BS)
    a = filled(pool, [5] * 4)
    b = filled(pool, [5] * 4)  # the same prompt prefilled beside a, before a was cached
    assert pool.num_cached == 1
    pool.free(b)
    pool.free(a)
    assert pool.num_cached == 1 and pool.num_free == 4


def test_reset_forgets_every_prefix_and_frees_idle_blocks():
    pool = BlockPool(4, BS)
    pool.free(filled(pool, [1] * 8))
    held = filled(pool, [2] * 4)
    pool.reset()
    assert pool.num_cached == 0 and pool.num_free == 3
    assert pool.lookup(hashes_of(pool, [1] * 8)) == [] and pool.lookup(hashes_of(pool, [2] * 4)) == []
    pool.free(held)
    assert pool.num_free == 4


def test_without_caching_nothing_is_found_or_kept():
    pool = BlockPool(4, BS, caching=False)
    pool.free(filled(pool, list(range(8))))
    assert pool.num_cached == 0 and pool.lookup(hashes_of(pool, list(range(8)))) == []
