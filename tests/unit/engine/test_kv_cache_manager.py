from lightspeed.engine.kv_cache_manager import KVCacheManager
from lightspeed.engine.request import Request
from lightspeed.protocol import (
    KvRemoved,
    KvStored,
    PreprocessedRequest,
    StopConditions,
    StoredBlock,
)

BS = 4


def make(rid: str, tokens: list[int], caching: bool = True) -> Request:
    pre = PreprocessedRequest(request_id=rid, model="m", token_ids=tokens, stop=StopConditions(max_tokens=8))
    return Request(pre, BS, max_model_len=64, hash_blocks=caching)


def computed(kv: KVCacheManager, request: Request, num_tokens: int) -> None:
    """Pretend a step computed the request up to `num_tokens` and fold it in."""
    request.num_computed_tokens = num_tokens
    kv.cache_blocks(request)
    kv.check_integrity()


PROMPT = list(range(1, 11))  # 10 tokens: 2 full blocks + 2


def test_miss_allocates_blocks_and_caches_after_compute() -> None:
    kv = KVCacheManager(8, BS)
    req = make("a", PROMPT)
    hit, num = kv.get_computed_blocks(req)
    assert (len(hit), num) == (0, 0)
    assert kv.allocate_slots(req, 10, hit)
    kv.check_integrity()
    assert kv.get_block_ids("a") == [0, 1, 2]
    assert kv.take_events() == []  # nothing is cached before it is computed
    computed(kv, req, 10)
    assert kv.take_events() == [
        KvStored(
            blocks=[
                StoredBlock(block_hash=req.block_hashes[0], tokens_hash=req.local_hashes[0]),
                StoredBlock(block_hash=req.block_hashes[1], tokens_hash=req.local_hashes[1]),
            ],
            parent_hash=None,
        )
    ]
    assert kv.usage == 3 / 8


def test_prefix_hit_shares_blocks() -> None:
    kv = KVCacheManager(8, BS)
    a = make("a", PROMPT)
    kv.allocate_slots(a, 10)
    computed(kv, a, 10)
    assert len(kv.take_events()) == 1
    b = make("b", PROMPT[:8] + [99, 98, 97])
    hit, num = kv.get_computed_blocks(b)
    assert num == 8
    assert kv.allocate_slots(b, 11 - 8, hit)
    b.num_computed_tokens = 8
    kv.check_integrity()
    assert kv.get_block_ids("b") == [0, 1, 3]
    assert [blk.ref_cnt for blk in kv.pool.blocks[:4]] == [2, 2, 1, 1]
    computed(kv, b, 11)
    # b has only two full blocks, both already cached by a: nothing new is stored.
    assert kv.take_events() == []


def test_full_prompt_hit_leaves_the_last_token_to_compute() -> None:
    kv = KVCacheManager(8, BS)
    a = make("a", PROMPT[:8])
    kv.allocate_slots(a, 8)
    computed(kv, a, 8)
    b = make("b", PROMPT[:8])
    _, num = kv.get_computed_blocks(b)
    assert num == 4  # (8 - 1) // 4 blocks: the second block holds the last token


def test_failed_allocation_changes_nothing() -> None:
    kv = KVCacheManager(3, BS)
    a = make("a", PROMPT)
    assert kv.allocate_slots(a, 10)
    b = make("b", [50, 51, 52, 53, 54])
    free_before = kv.pool.free_block_ids()
    assert not kv.allocate_slots(b, 5)
    kv.check_integrity()
    assert kv.get_block_ids("b") == []
    assert kv.pool.free_block_ids() == free_before


def test_decode_growth_allocates_at_block_boundaries() -> None:
    kv = KVCacheManager(8, BS)
    req = make("a", [1, 2, 3])
    assert kv.allocate_slots(req, 3)
    assert kv.get_block_ids("a") == [0]
    computed(kv, req, 3)
    req.append_output(4)
    assert kv.allocate_slots(req, 1)
    assert kv.get_block_ids("a") == [0]
    computed(kv, req, 4)
    req.append_output(5)
    assert kv.allocate_slots(req, 1)
    assert kv.get_block_ids("a") == [0, 1]
    computed(kv, req, 5)
    assert kv.take_events() == [
        KvStored(blocks=[StoredBlock(block_hash=req.block_hashes[0], tokens_hash=req.local_hashes[0])])
    ]


def test_free_releases_tail_first_and_blocks_are_reusable_by_hash() -> None:
    kv = KVCacheManager(4, BS)
    a = make("a", PROMPT)
    kv.allocate_slots(a, 10)
    computed(kv, a, 10)
    kv.take_events()
    kv.free(a)
    kv.check_integrity()
    assert kv.get_block_ids("a") == []
    # Block 2 (partial, uncached) goes to the head; cached ones deepest first.
    assert kv.pool.free_block_ids() == [2, 3, 1, 0]
    c = make("c", [70, 71, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82])
    assert kv.allocate_slots(c, 13)
    kv.check_integrity()
    assert kv.get_block_ids("c") == [2, 3, 1, 0]
    assert kv.take_events() == [KvRemoved(block_hashes=[a.block_hashes[1], a.block_hashes[0]])]


def test_revived_hit_blocks_count_against_free_space_and_reserve() -> None:
    kv = KVCacheManager(3, BS)
    a = make("a", PROMPT[:8])
    kv.allocate_slots(a, 8)
    computed(kv, a, 8)
    kv.free(a)
    b = make("b", PROMPT[:8] + [90, 91, 92, 93])
    hit, num = kv.get_computed_blocks(b)
    assert num == 8
    assert not kv.allocate_slots(b, 4, hit, reserve_blocks=1)
    kv.check_integrity()
    assert kv.allocate_slots(b, 4, hit)
    kv.check_integrity()
    assert kv.get_block_ids("b") == [0, 1, 2]
    assert kv.pool.num_free_blocks == 0


def test_caching_disabled_never_hits() -> None:
    kv = KVCacheManager(8, BS, enable_caching=False)
    a = make("a", PROMPT, caching=False)
    kv.allocate_slots(a, 10)
    computed(kv, a, 10)
    kv.free(a)
    b = make("b", PROMPT, caching=False)
    assert kv.get_computed_blocks(b)[1] == 0
    assert kv.take_events() == []


def test_duplicate_computed_blocks_are_swapped_for_the_cached_copy() -> None:
    kv = KVCacheManager(8, BS)
    a = make("a", PROMPT)
    b = make("b", PROMPT)
    # Both miss (admitted in the same step) and compute the same prefix.
    assert kv.allocate_slots(a, 10)
    assert kv.allocate_slots(b, 10)
    assert kv.get_block_ids("b") == [3, 4, 5]
    computed(kv, a, 10)
    computed(kv, b, 10)
    assert kv.get_block_ids("b") == [0, 1, 5]
    assert [blk.ref_cnt for blk in kv.pool.blocks[:6]] == [2, 2, 1, 0, 0, 1]
    assert kv.pool.free_block_ids()[:2] == [4, 3]  # the duplicates are free, uncached
    assert len(kv.take_events()) == 1  # only a's Stored: the router hears of each hash once
