"""Per-request block tables on top of the block pool: prefix lookup, slot allocation, caching.

The scheduler talks to this class only in token counts and opaque `ComputedBlocks` handles; it
never sees a block. Blocks become cached (and emit Stored) only after the step that computed them
has finished (`cache_blocks`), so a prefix hit can never point at KV that is still being written.
"""

from __future__ import annotations

from collections.abc import Sequence

from lightspeed.engine.block_pool import BlockPool, KVCacheBlock
from lightspeed.engine.request import Request
from lightspeed.protocol import KvEventData, KvStored


class ComputedBlocks:
    """Opaque handle to a prefix hit, passed from `get_computed_blocks` to `allocate_slots`."""

    __slots__ = ("blocks",)

    def __init__(self, blocks: Sequence[KVCacheBlock] = ()) -> None:
        self.blocks: tuple[KVCacheBlock, ...] = tuple(blocks)

    def __len__(self) -> int:
        return len(self.blocks)


_NO_HIT = ComputedBlocks()


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, block_size, enable_caching)
        self._blocks: dict[str, list[KVCacheBlock]] = {}
        # Block ids are kept alongside the blocks so the scheduler can hand the runner the live
        # list each step instead of rebuilding an O(context) list per sequence per step.
        self._block_ids: dict[str, list[int]] = {}
        self._num_cached: dict[str, int] = {}
        # Blocks of finished requests kept referenced for a KV transfer (disaggregated prefill):
        # not evictable until `release_held`, so a decode worker's pull never reads reused blocks.
        self._held: dict[str, list[KVCacheBlock]] = {}

    # ------------------------------------------------------------------ queries

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by requests."""
        return self.pool.usage

    def get_block_ids(self, request_id: str) -> list[int]:
        """The request's block table. Live view: read it, do not keep or mutate it."""
        return self._block_ids.get(request_id, [])

    def get_computed_blocks(self, request: Request) -> tuple[ComputedBlocks, int]:
        """Longest consecutive cached prefix of the request, as (handle, number of tokens).

        The last token is always left to compute, so the step yields logits to sample from.
        """
        if not self.enable_caching or not request.block_hashes:
            return _NO_HIT, 0
        max_blocks = min((request.num_tokens - 1) // self.block_size, len(request.block_hashes))
        hits: list[KVCacheBlock] = []
        lookup = self.pool.get_cached_block
        for seq_hash in request.block_hashes[:max_blocks]:
            block = lookup(seq_hash)
            if block is None:
                break
            hits.append(block)
        if not hits:
            return _NO_HIT, 0
        return ComputedBlocks(hits), len(hits) * self.block_size

    # ------------------------------------------------------------------ allocation

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        computed: ComputedBlocks | None = None,
        reserve_blocks: int = 0,
    ) -> bool:
        """Give the request blocks for `num_new_tokens` more tokens after its computed ones.

        `computed` is a prefix hit from `get_computed_blocks` for a request that holds no blocks
        yet. Returns False, changing nothing, when fewer than `reserve_blocks` blocks would be
        left free afterwards.
        """
        hit = computed.blocks if computed is not None else ()
        rid = request.request_id
        owned = self._blocks.get(rid)
        num_owned = len(owned) if owned is not None else 0
        total = request.num_computed_tokens + len(hit) * self.block_size + num_new_tokens
        need = -(-total // self.block_size) - num_owned - len(hit)
        if need <= 0 and not hit:
            return True  # fast path: a decode step inside the last block
        # Reviving a free cached block takes it out of the free queue too.
        revived = sum(1 for b in hit if b.ref_cnt == 0)
        if max(need, 0) + revived + reserve_blocks > self.pool.num_free_blocks:
            return False
        if owned is None:
            owned = self._blocks[rid] = []
            self._block_ids[rid] = []
            self._num_cached[rid] = 0
        ids = self._block_ids[rid]
        if hit:
            self.pool.touch(hit)
            owned.extend(hit)
            ids.extend(b.block_id for b in hit)
            self._num_cached[rid] = len(owned)
        if need > 0:
            new = self.pool.get_new_blocks(need)
            owned.extend(new)
            ids.extend(b.block_id for b in new)
        return True

    def cache_blocks(self, request: Request) -> None:
        """Cache the request's blocks that are full and computed (call after each step).

        A block whose hash is already cached elsewhere (two requests computed the same prefix
        at once) is swapped for the cached copy and released, so each hash lives in exactly
        one block and a request's cached prefix is always pinned by its own references: the
        parent of every Stored event is then guaranteed to still be cached.
        """
        if not self.enable_caching:
            return
        rid = request.request_id
        done = self._num_cached.get(rid)
        if done is None:
            return
        full = min(request.num_computed_tokens // self.block_size, len(request.block_hashes))
        if full <= done:
            return
        blocks = self._blocks[rid]
        lookup = self.pool.get_cached_block
        for i in range(done, full):
            existing = lookup(request.block_hashes[i])
            if existing is not None and existing is not blocks[i]:
                self._swap(rid, i, existing)
        self.pool.cache_full_blocks(blocks, request.block_hashes, request.local_hashes, done, full)
        self._num_cached[rid] = full

    def _swap(self, request_id: str, index: int, cached: KVCacheBlock) -> None:
        """Point a block-table slot at an identical cached block and release the duplicate.

        Safe because both hold the KV of the same tokens after the same prefix; it runs only
        between steps, so the runner never sees the table change mid-step.
        """
        blocks = self._blocks[request_id]
        self.pool.touch([cached])
        self.pool.free_blocks([blocks[index]])
        blocks[index] = cached
        self._block_ids[request_id][index] = cached.block_id

    def free(self, request: Request) -> None:
        """Release the request's blocks, tail first so its deepest blocks are evicted first."""
        rid = request.request_id
        blocks = self._blocks.pop(rid, None)
        self._block_ids.pop(rid, None)
        self._num_cached.pop(rid, None)
        if blocks:
            self.pool.free_blocks(reversed(blocks))

    def hold(self, request: Request) -> list[int]:
        """Keep a finished request's blocks referenced under its id instead of freeing them
        (the prefill side of a KV transfer); returns their ids in block-table order."""
        rid = request.request_id
        blocks = self._blocks.pop(rid, [])
        self._block_ids.pop(rid, None)
        self._num_cached.pop(rid, None)
        self._held[rid] = blocks
        return [b.block_id for b in blocks]

    def release_held(self, request_id: str) -> bool:
        """Free blocks kept by `hold`; False if none are held under that id."""
        blocks = self._held.pop(request_id, None)
        if blocks is None:
            return False
        self.pool.free_blocks(reversed(blocks))
        return True

    @property
    def held_ids(self) -> list[str]:
        return list(self._held)

    # ------------------------------------------------------------------ pass-throughs

    def take_events(self) -> list[KvEventData]:
        return self.pool.take_events()

    def dump_cached(self) -> list[KvStored]:
        return self.pool.dump_cached()

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_prefix_cache()

    def check_integrity(self) -> None:
        """Pool integrity plus: ref counts equal the number of block tables holding each block."""
        self.pool.check_integrity()
        refs = [0] * self.pool.num_blocks
        for rid, blocks in self._blocks.items():
            if [b.block_id for b in blocks] != self._block_ids[rid]:
                raise AssertionError(f"block ids of {rid} out of sync")
            for block in blocks:
                refs[block.block_id] += 1
        for blocks in self._held.values():
            for block in blocks:
                refs[block.block_id] += 1
        for block in self.pool.blocks:
            if block.ref_cnt != refs[block.block_id]:
                raise AssertionError(f"{block} referenced by {refs[block.block_id]} tables")
