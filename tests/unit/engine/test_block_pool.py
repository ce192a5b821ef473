import pytest

from lightspeed.engine.block_pool import BlockPool, KVCacheBlock
from lightspeed.protocol import KvCleared, KvRemoved, KvStored, StoredBlock

SEQ = [100, 101, 102, 103, 104]
LOCAL = [200, 201, 202, 203, 204]


def ids(blocks: list[KVCacheBlock]) -> list[int]:
    return [b.block_id for b in blocks]


def checked(pool: BlockPool) -> BlockPool:
    pool.check_integrity()
    return pool


def stored(*pairs: tuple[int, int], parent: int | None = None) -> KvStored:
    return KvStored(blocks=[StoredBlock(block_hash=h, tokens_hash=t) for h, t in pairs], parent_hash=parent)


def test_fresh_allocation_takes_lowest_ids_first() -> None:
    pool = checked(BlockPool(6, 2))
    blocks = pool.get_new_blocks(3)
    checked(pool)
    assert ids(blocks) == [0, 1, 2]
    assert [b.ref_cnt for b in blocks] == [1, 1, 1]
    assert pool.free_block_ids() == [3, 4, 5]
    assert (pool.num_free_blocks, pool.num_active_blocks, pool.num_cached_blocks) == (3, 3, 0)
    assert pool.usage == 0.5


def test_over_allocation_raises_and_changes_nothing() -> None:
    pool = BlockPool(2, 2)
    with pytest.raises(ValueError):
        pool.get_new_blocks(3)
    checked(pool)
    assert pool.free_block_ids() == [0, 1]


def test_freed_uncached_blocks_go_to_the_head() -> None:
    pool = BlockPool(6, 2)
    blocks = pool.get_new_blocks(3)
    pool.free_blocks(reversed(blocks))
    checked(pool)
    assert pool.free_block_ids() == [0, 1, 2, 3, 4, 5]
    assert pool.take_events() == []


def test_cache_emits_stored_with_parent_chain() -> None:
    pool = BlockPool(6, 2)
    blocks = pool.get_new_blocks(3)
    pool.cache_full_blocks(blocks, SEQ, LOCAL, 0, 2)
    checked(pool)
    pool.cache_full_blocks(blocks, SEQ, LOCAL, 2, 3)
    checked(pool)
    assert pool.take_events() == [
        stored((100, 200), (101, 201)),
        stored((102, 202), parent=101),
    ]
    assert pool.take_events() == []
    assert pool.num_cached_blocks == 3
    assert pool.get_cached_block(101) is blocks[1]
    assert pool.get_cached_block(999) is None


def test_lru_eviction_order_tail_blocks_first() -> None:
    pool = BlockPool(6, 2)
    blocks = pool.get_new_blocks(3)
    pool.cache_full_blocks(blocks, SEQ, LOCAL, 0, 3)
    pool.take_events()
    pool.free_blocks(reversed(blocks))
    checked(pool)
    # Uncached free blocks are handed out first, then cached ones in LRU order, deepest first.
    assert pool.free_block_ids() == [3, 4, 5, 2, 1, 0]
    assert (pool.num_free_blocks, pool.num_active_blocks, pool.num_cached_blocks) == (6, 0, 3)
    new = pool.get_new_blocks(4)
    checked(pool)
    assert ids(new) == [3, 4, 5, 2]
    assert pool.take_events() == [KvRemoved(block_hashes=[102])]
    assert new[3].block_hash is None
    assert pool.get_cached_block(102) is None
    more = pool.get_new_blocks(2)
    checked(pool)
    assert ids(more) == [1, 0]
    assert pool.take_events() == [KvRemoved(block_hashes=[101, 100])]


def test_prefix_hit_revives_free_cached_block_and_refreshes_lru() -> None:
    pool = BlockPool(4, 2)
    a = pool.get_new_blocks(2)
    pool.cache_full_blocks(a, SEQ, LOCAL, 0, 2)
    pool.free_blocks(reversed(a))
    assert pool.free_block_ids() == [2, 3, 1, 0]
    hit = pool.get_cached_block(100)
    assert hit is a[0]
    pool.touch([hit])
    checked(pool)
    assert hit.ref_cnt == 1
    assert pool.free_block_ids() == [2, 3, 1]
    pool.touch([hit])  # a second request shares it
    assert hit.ref_cnt == 2
    pool.free_blocks([hit])
    checked(pool)
    assert pool.free_block_ids() == [2, 3, 1]
    pool.free_blocks([hit])
    checked(pool)
    # Recently used again: it now sits behind block 1 in eviction order.
    assert pool.free_block_ids() == [2, 3, 1, 0]


def test_duplicate_hash_is_not_cached_twice_and_splits_the_event() -> None:
    pool = BlockPool(6, 2)
    a = pool.get_new_blocks(2)
    pool.cache_full_blocks(a, SEQ, LOCAL, 0, 2)
    b = pool.get_new_blocks(3)
    pool.cache_full_blocks(b, [100, 101, 105], [200, 201, 205], 0, 3)
    checked(pool)
    assert pool.take_events() == [stored((100, 200), (101, 201)), stored((105, 205), parent=101)]
    assert b[0].block_hash is None and b[1].block_hash is None
    assert b[2].block_hash == 105
    assert pool.num_cached_blocks == 3


def test_double_free_is_detected() -> None:
    pool = BlockPool(2, 2)
    (block,) = pool.get_new_blocks(1)
    pool.free_blocks([block])
    with pytest.raises(RuntimeError):
        pool.free_blocks([block])


def test_reset_prefix_cache_refused_while_in_use_then_clears() -> None:
    pool = BlockPool(4, 2)
    a = pool.get_new_blocks(2)
    pool.cache_full_blocks(a, SEQ, LOCAL, 0, 2)
    pool.take_events()
    assert pool.reset_prefix_cache() is False
    assert pool.take_events() == []
    pool.free_blocks(reversed(a))
    assert pool.reset_prefix_cache() is True
    checked(pool)
    assert pool.take_events() == [KvCleared()]
    assert pool.num_cached_blocks == 0
    pool.get_new_blocks(4)
    assert pool.take_events() == []  # nothing left to evict


def test_dump_cached_lists_chains_parents_first() -> None:
    pool = BlockPool(8, 2)
    a = pool.get_new_blocks(3)
    pool.cache_full_blocks(a, SEQ, LOCAL, 0, 3)
    b = pool.get_new_blocks(2)
    pool.touch([a[0], a[1]])
    table = [a[0], a[1], *b]
    pool.cache_full_blocks(table, [100, 101, 110, 111], [200, 201, 210, 211], 2, 4)
    orphan = pool.get_new_blocks(2)
    pool.cache_full_blocks(orphan, [120, 121], [220, 221], 1, 2)  # its parent 120 is not cached
    checked(pool)
    assert pool.take_events()[-1] == stored((121, 221), parent=120)
    assert pool.dump_cached() == [
        stored((100, 200), (101, 201), (102, 202)),
        stored((110, 210), (111, 211), parent=101),
        stored((121, 221), parent=120),
    ]


def test_integrity_check_catches_corruption() -> None:
    pool = BlockPool(2, 2)
    (block,) = pool.get_new_blocks(1)
    block.ref_cnt = 0
    with pytest.raises(AssertionError):
        pool.check_integrity()


def test_caching_disabled_records_nothing() -> None:
    pool = BlockPool(4, 2, enable_caching=False)
    a = pool.get_new_blocks(2)
    pool.cache_full_blocks(a, SEQ, LOCAL, 0, 2)
    checked(pool)
    assert pool.num_cached_blocks == 0
    assert pool.take_events() == []
