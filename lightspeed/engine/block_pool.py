"""Physical KV blocks: reference counts, an LRU free queue, the prefix-cache hash map, KV events.

Every block is either *in use* (ref_cnt > 0, owned by one or more requests) or *free* (in the free
queue). A free block may still hold a cached prefix (it has a sequence hash and sits in the hash
map): it can be revived by a prefix hit, or evicted when the queue hands it out for new data.
The queue is in eviction order, head first. Freed blocks that hold no reusable data go to the head
(reuse them before evicting anything); freed cached blocks go to the tail, so the least recently
used cached block is evicted first. Callers free a request's blocks tail-first, so within one
request the deepest (least shareable) blocks are evicted before the prefix they hang off.

Changes to the set of cached hashes are recorded as protocol KV events (Stored / Removed /
Cleared) in order; the engine drains them with `take_events()` and the worker numbers them.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable, Sequence

from lightspeed.protocol import KvCleared, KvEventData, KvRemoved, KvStored, StoredBlock

logger = logging.getLogger(__name__)


class KVCacheBlock:
    """One fixed-size KV block. `block_hash` is its sequence hash while it is in the cache."""

    __slots__ = ("block_hash", "block_id", "local_hash", "parent_hash", "ref_cnt")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: int | None = None
        self.local_hash: int | None = None
        self.parent_hash: int | None = None

    def __repr__(self) -> str:
        return f"KVCacheBlock(id={self.block_id}, ref={self.ref_cnt}, hash={self.block_hash})"


class BlockPool:
    """Owns all blocks of one KV cache; hands them out and takes them back."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        # OrderedDict gives O(1) pop-head, push-tail, push-head and remove-from-middle in C.
        self._free: OrderedDict[int, KVCacheBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._cached: dict[int, KVCacheBlock] = {}
        self._events: list[KvEventData] = []

    # ------------------------------------------------------------------ counts

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now, including evictable cached ones."""
        return len(self._free)

    @property
    def num_active_blocks(self) -> int:
        """Blocks referenced by at least one request."""
        return self.num_blocks - len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks holding a reusable prefix (in use or evictable)."""
        return len(self._cached)

    @property
    def usage(self) -> float:
        return (self.num_blocks - len(self._free)) / self.num_blocks

    def free_block_ids(self) -> list[int]:
        """Free queue in eviction order (head first); for tests and debugging."""
        return list(self._free)

    # ------------------------------------------------------------------ allocation

    def get_cached_block(self, seq_hash: int) -> KVCacheBlock | None:
        return self._cached.get(seq_hash)

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Take a reference on prefix-hit blocks, reviving free ones out of the queue."""
        free = self._free
        for block in blocks:
            if block.ref_cnt == 0:
                del free[block.block_id]
            block.ref_cnt += 1

    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        """Pop `num_blocks` from the head of the free queue, evicting any cached hash they hold."""
        if num_blocks > len(self._free):
            raise ValueError(f"cannot allocate {num_blocks} blocks, only {len(self._free)} free")
        out: list[KVCacheBlock] = []
        removed: list[int] = []
        pop = self._free.popitem
        for _ in range(num_blocks):
            block = pop(last=False)[1]
            if block.block_hash is not None:
                removed.append(self._evict(block))
            block.ref_cnt = 1
            out.append(block)
        if removed:
            self._events.append(KvRemoved(block_hashes=removed))
        return out

    def _evict(self, block: KVCacheBlock) -> int:
        seq_hash = block.block_hash
        assert seq_hash is not None
        del self._cached[seq_hash]
        block.block_hash = block.local_hash = block.parent_hash = None
        return seq_hash

    def free_blocks(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Drop one reference per block, in the order given (callers pass a request tail-first)."""
        free = self._free
        for block in blocks:
            block.ref_cnt -= 1
            if block.ref_cnt > 0:
                continue
            if block.ref_cnt < 0:
                raise RuntimeError(f"double free of block {block.block_id}")
            free[block.block_id] = block
            if block.block_hash is None:
                free.move_to_end(block.block_id, last=False)

    # ------------------------------------------------------------------ caching

    def cache_full_blocks(
        self,
        blocks: Sequence[KVCacheBlock],
        seq_hashes: Sequence[int],
        local_hashes: Sequence[int],
        start: int,
        end: int,
    ) -> None:
        """Register blocks[start:end] (now full and computed) under their sequence hashes.

        A hash already held by another block is not registered twice (the router already knows
        it), which splits the Stored event: each contiguous run gets its own event whose
        parent_hash chains to the block before the run.
        """
        if not self.enable_caching:
            return
        run: list[StoredBlock] = []
        run_parent: int | None = seq_hashes[start - 1] if start > 0 else None
        for i in range(start, end):
            block, seq_hash = blocks[i], seq_hashes[i]
            parent = seq_hashes[i - 1] if i > 0 else None
            if block.block_hash is not None or seq_hash in self._cached:
                self._flush_stored(run, run_parent)
                run, run_parent = [], seq_hash
                continue
            block.block_hash, block.local_hash, block.parent_hash = (
                seq_hash,
                local_hashes[i],
                parent,
            )
            self._cached[seq_hash] = block
            run.append(StoredBlock(block_hash=seq_hash, tokens_hash=local_hashes[i]))
        self._flush_stored(run, run_parent)

    def _flush_stored(self, run: list[StoredBlock], parent: int | None) -> None:
        if run:
            self._events.append(KvStored(blocks=run, parent_hash=parent))

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash (emits Cleared). Refused while any block is in use."""
        if self.num_active_blocks > 0:
            logger.warning("reset_prefix_cache refused: %d blocks in use", self.num_active_blocks)
            return False
        for block in self._cached.values():
            block.block_hash = block.local_hash = block.parent_hash = None
        self._cached.clear()
        self._events.append(KvCleared())
        return True

    # ------------------------------------------------------------------ events

    def take_events(self) -> list[KvEventData]:
        """Drain the KV events recorded since the last call, oldest first."""
        events, self._events = self._events, []
        return events

    def dump_cached(self) -> list[KvStored]:
        """Every cached hash as Stored events, parents before children (gap recovery)."""
        events: list[KvStored] = []
        emitted: set[int] = set()
        for seq_hash in self._cached:
            if seq_hash not in emitted:
                self._dump_chain(seq_hash, emitted, events)
        return events

    def _dump_chain(self, seq_hash: int, emitted: set[int], events: list[KvStored]) -> None:
        chain: list[KVCacheBlock] = []
        block = self._cached.get(seq_hash)
        while block is not None and block.block_hash not in emitted:
            chain.append(block)
            parent = block.parent_hash
            block = self._cached.get(parent) if parent is not None else None
        for block in reversed(chain):
            assert block.block_hash is not None and block.local_hash is not None
            stored = StoredBlock(block_hash=block.block_hash, tokens_hash=block.local_hash)
            last = events[-1] if events else None
            if last is not None and last.blocks[-1].block_hash == block.parent_hash:
                last.blocks.append(stored)  # extend the chain just emitted: one event per chain
            else:
                events.append(KvStored(blocks=[stored], parent_hash=block.parent_hash))
            emitted.add(block.block_hash)

    # ------------------------------------------------------------------ integrity

    def check_integrity(self) -> None:
        """Raise AssertionError if ref counts, the free queue and the hash map disagree."""
        free_uncached = free_cached = in_use = 0
        for block in self.blocks:
            in_queue = block.block_id in self._free
            if in_queue == (block.ref_cnt > 0) or block.ref_cnt < 0:
                raise AssertionError(f"{block} in_free_queue={in_queue}")
            if block.block_hash is not None and self._cached.get(block.block_hash) is not block:
                raise AssertionError(f"{block} has a hash missing from the hash map")
            if not in_queue:
                in_use += 1
            elif block.block_hash is None:
                free_uncached += 1
            else:
                free_cached += 1
        for seq_hash, block in self._cached.items():
            if block.block_hash != seq_hash:
                raise AssertionError(f"hash map entry {seq_hash} points at {block}")
        if free_uncached + free_cached + in_use != self.num_blocks:
            raise AssertionError("block accounting does not add up")
        if len(self._free) != free_uncached + free_cached:
            raise AssertionError("free queue holds unknown blocks")
