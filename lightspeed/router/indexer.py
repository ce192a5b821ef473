"""Prefix indexes for the KV-aware router: which worker caches how much of a prompt's prefix.

A sequence hash names a block *and its whole prefix*, so a flat map `seq_hash -> owners` is an
exact prefix index: no tree is needed to tell "block 7 after this prefix" from "block 7 after
another prefix", and a lookup walks the prompt's sequence hashes front to back until no worker
has the next one. Owners are a bitmask (one bit per worker slot) so a walk step is one dict
probe plus one integer AND, and a whole 8k-token prompt (128 blocks) is matched in microseconds.

`KvIndex` is fed by workers' KV events (exact mode); `ApproxIndex` records the router's own
routing decisions with a TTL (approximate mode, for engines that publish no events). Both are a
`PrefixIndex`, the one seam the KV selector uses, so it never asks which mode it is in.

Not modelled yet: storage tiers (host/disk blocks count like device blocks) and data-parallel
ranks (a worker id is the unit of ownership; publish one id per rank if ranks cache separately).
"""

from __future__ import annotations

import heapq
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from lightspeed.protocol import KvCleared, KvEvent, KvEventData, KvRemoved, KvStored

logger = logging.getLogger(__name__)


class PrefixIndex(Protocol):
    """What the KV selector needs of an index: prefix overlaps, and word of its own decisions."""

    def find_matches(self, seq_hashes: Sequence[int]) -> dict[str, int]:
        """worker_id -> consecutive leading blocks of `seq_hashes` it caches (only workers with >= 1)."""
        ...

    def record(self, worker_id: str, seq_hashes: Sequence[int]) -> None:
        """`worker_id` was just routed a prompt with these full blocks (by this router or a replica)."""
        ...

    def remove_worker(self, worker_id: str) -> None:
        """Forget a worker that left; unknown ids are a no-op."""
        ...


# Bounds on the two memo tables below: both only save work, so clearing them is always safe.
_INTERN_LIMIT = 1 << 16
_NAMES_CACHE_LIMIT = 1 << 12


class _OwnerMap:
    """seq_hash -> the workers holding it, as a bitmask over small reusable worker slots.

    Masks are interned: a fleet has few distinct owner sets (a hot prefix sits on the same
    workers block after block), so sharing one int object per set keeps a lookup walk from
    touching a fresh cache line for every block's mask. The names of a mask's workers are
    memoized for the same reason, so reporting 64 matching workers is not 64 bit-twiddles.
    """

    __slots__ = ("_bit_of", "_free", "_interned", "_names", "_names_of", "blocks")

    def __init__(self) -> None:
        self.blocks: dict[int, int] = {}
        self._interned: dict[int, int] = {}
        self._bit_of: dict[str, int] = {}
        self._names: list[str | None] = []  # worker id by slot; None for a free slot
        self._free: list[int] = []  # heap: lowest free slot first keeps masks narrow
        self._names_of: dict[int, tuple[str, ...]] = {}

    def mask(self, worker_id: str) -> int:
        """The worker's single-bit mask, allocating a slot on first use."""
        pos = self._bit_of.get(worker_id)
        if pos is None:
            pos = heapq.heappop(self._free) if self._free else len(self._names)
            if pos == len(self._names):
                self._names.append(worker_id)
            else:
                self._names[pos] = worker_id
            self._bit_of[worker_id] = pos
        return 1 << pos

    def release(self, worker_id: str) -> None:
        """Free the worker's slot; the caller must have cleared its bit from every block."""
        pos = self._bit_of.pop(worker_id, None)
        if pos is not None:
            self._names[pos] = None
            heapq.heappush(self._free, pos)
            self._names_of.clear()  # the slot may be reused under another name

    def add(self, seq_hashes: Iterable[int], bit: int) -> None:
        blocks, interned = self.blocks, self._interned
        for seq_hash in seq_hashes:
            owners = blocks.get(seq_hash, 0) | bit
            blocks[seq_hash] = interned.setdefault(owners, owners)
        if len(interned) > _INTERN_LIMIT:
            interned.clear()

    def discard(self, seq_hashes: Iterable[int], bit: int) -> None:
        """Clear `bit` from blocks the caller knows the worker holds."""
        blocks, interned = self.blocks, self._interned
        keep = ~bit
        for seq_hash in seq_hashes:
            owners = blocks[seq_hash] & keep
            if owners:
                blocks[seq_hash] = interned.setdefault(owners, owners)
            else:
                del blocks[seq_hash]

    def match(self, seq_hashes: Iterable[int]) -> dict[str, int]:
        """Prefix depth per worker. A worker leaves the live set at most once, so the walk
        costs one probe per block plus one name lookup per distinct drop depth."""
        get = self.blocks.get
        drops: list[tuple[int, int]] = []
        live = -1  # all bits: the first block decides who is in the running
        depth = 0
        for seq_hash in seq_hashes:
            nxt = live & get(seq_hash, 0)
            if nxt != live:
                if depth:
                    drops.append((live ^ nxt, depth))
                if not nxt:
                    break
                live = nxt
            depth += 1  # noqa: SIM113 -- the count must survive `break` and the for-else
        else:
            if depth:
                drops.append((live, depth))
        out: dict[str, int] = {}
        for owners, at in drops:
            out.update(dict.fromkeys(self._names_for(owners), at))
        return out

    def _names_for(self, owners: int) -> tuple[str, ...]:
        names = self._names_of.get(owners)
        if names is None:
            if len(self._names_of) > _NAMES_CACHE_LIMIT:
                self._names_of.clear()
            # Only live slots have bits in an owner mask, so every name found here is a str.
            slots = self._names
            found = [slots[pos] for pos in range(owners.bit_length()) if owners >> pos & 1]
            names = tuple(name for name in found if name is not None)
            self._names_of[owners] = names
        return names


class KvIndex:
    """Exact prefix index fed by workers' KV events."""

    def __init__(self) -> None:
        self._owners = _OwnerMap()
        self._held: dict[str, set[int]] = {}  # worker -> its seq hashes (removal, dumps, counts)
        # Last applied event id per known worker. None: re-synced from a dump whose event id is
        # unknown, so the next event (whatever its id) re-anchors the stream.
        self._last_id: dict[str, int | None] = {}

    # ------------------------------------------------------------------ events

    def apply(self, event: KvEvent) -> bool:
        """Apply one event. Returns False, applying nothing, when event.event_id is not
        last_event_id(worker)+1 and is newer (a gap: the caller must resync that worker via a
        dump). An event with event_id <= last seen is a stale duplicate: ignored, returns True.
        The first event ever seen from a worker is accepted only if its event_id == 1."""
        worker_id, event_id = event.worker_id, event.event_id
        if worker_id in self._last_id:
            last = self._last_id[worker_id]
            if last is not None:
                if event_id <= last:
                    return True
                if event_id != last + 1:
                    logger.debug("kv event gap for %s: last %d, got %d", worker_id, last, event_id)
                    return False
        elif event_id != 1:
            logger.debug("first kv event of %s has id %d, not 1", worker_id, event_id)
            return False
        self._apply_data(worker_id, event.data)
        self._last_id[worker_id] = event_id
        return True

    def apply_dump(self, worker_id: str, events: Sequence[KvEvent], dump_event_id: int | None = None) -> None:
        """Replace everything known about worker_id with the dump (KvStored events of all its
        cached blocks; may be empty) and set its last event id to max(event_id) of the dump, or
        to `dump_event_id` when given. An empty dump without `dump_event_id` leaves the stream
        unanchored: the worker's next event is accepted whatever its id.

        The events' own `worker_id` is not checked: the dump is applied to `worker_id`."""
        self._clear(worker_id)
        for event in events:
            self._apply_data(worker_id, event.data)
        if dump_event_id is None and events:
            dump_event_id = max(event.event_id for event in events)
        self._last_id[worker_id] = dump_event_id

    def remove_worker(self, worker_id: str) -> None:
        """Forget a worker that left discovery: its blocks, its event stream and its slot."""
        self._clear(worker_id)
        self._held.pop(worker_id, None)
        self._last_id.pop(worker_id, None)
        self._owners.release(worker_id)

    def _apply_data(self, worker_id: str, data: KvEventData) -> None:
        if type(data) is KvStored:
            self._store(worker_id, data)
        elif type(data) is KvRemoved:
            self._remove(worker_id, data.block_hashes)
        elif type(data) is KvCleared:
            self._clear(worker_id)
        else:  # pragma: no cover - KvEventData is a closed union
            raise TypeError(f"unknown KV event data {type(data).__name__}")

    def _store(self, worker_id: str, data: KvStored) -> None:
        # parent_hash is not needed: each sequence hash already names its whole prefix.
        held = self._held.get(worker_id)
        if held is None:
            held = self._held[worker_id] = set()
        new = [block.block_hash for block in data.blocks if block.block_hash not in held]
        if new:
            held.update(new)
            self._owners.add(new, self._owners.mask(worker_id))

    def _remove(self, worker_id: str, seq_hashes: Iterable[int]) -> None:
        held = self._held.get(worker_id)
        if not held:
            return
        # Removing a block the worker does not hold is a no-op, as in the engine.
        gone = [seq_hash for seq_hash in set(seq_hashes) if seq_hash in held]
        if gone:
            held.difference_update(gone)
            self._owners.discard(gone, self._owners.mask(worker_id))

    def _clear(self, worker_id: str) -> None:
        held = self._held.get(worker_id)
        if held:
            self._owners.discard(held, self._owners.mask(worker_id))
            held.clear()

    def record(self, worker_id: str, seq_hashes: Sequence[int]) -> None:
        """Nothing: only the worker's own events say what it caches. A routed prompt may still
        be queued, be evicted before it runs, or be refused, so recording it would overstate."""

    # ------------------------------------------------------------------ queries

    def find_matches(self, seq_hashes: Sequence[int]) -> dict[str, int]:
        """worker_id -> number of consecutive leading blocks of seq_hashes cached on that worker
        (only workers with >= 1). Stops walking as soon as no worker has the next block."""
        return self._owners.match(seq_hashes)

    def last_event_id(self, worker_id: str) -> int | None:
        return self._last_id.get(worker_id)

    def worker_blocks(self, worker_id: str) -> int:
        held = self._held.get(worker_id)
        return len(held) if held else 0

    @property
    def num_blocks(self) -> int:
        """Total (block, worker) pairs."""
        return sum(len(held) for held in self._held.values())

    @property
    def num_unique_blocks(self) -> int:
        """Distinct sequence hashes cached on at least one worker."""
        return len(self._owners.blocks)

    def workers(self) -> list[str]:
        return list(self._last_id)


class ApproxIndex:
    """Approximate mode (no KV events): the router records its own routing decisions; each
    recorded block expires `ttl` seconds after it was last recorded for that worker.

    Expiry is lazy: every `record` call appends one (expiry, worker, hashes) entry to a FIFO,
    and `expire` pops entries whose time has come, dropping only blocks whose current expiry
    still equals the entry's (a re-recorded block carries a later expiry and survives). Because
    the TTL is fixed, the FIFO is sorted as long as `clock` never goes backwards.
    """

    def __init__(self, ttl: float = 120.0, clock: Callable[[], float] = time.monotonic) -> None:
        if not ttl > 0:  # also rejects NaN
            raise ValueError(f"ttl must be > 0, got {ttl}")
        self._ttl = ttl
        self._clock = clock
        self._owners = _OwnerMap()
        self._expiry: dict[str, dict[int, float]] = {}  # worker -> seq_hash -> expiry time
        self._queue: deque[tuple[float, str, tuple[int, ...]]] = deque()

    def record(self, worker_id: str, seq_hashes: Sequence[int]) -> None:
        """Remember that `worker_id` now caches these blocks (it was just routed this prompt)."""
        if not seq_hashes:
            return
        expires = self._clock() + self._ttl
        held = self._expiry.get(worker_id)
        if held is None:
            held = self._expiry[worker_id] = {}
        hashes = tuple(seq_hashes)  # snapshot: the caller may reuse its list
        new = [seq_hash for seq_hash in hashes if seq_hash not in held]
        held.update(dict.fromkeys(hashes, expires))
        if new:
            self._owners.add(new, self._owners.mask(worker_id))
        self._queue.append((expires, worker_id, hashes))

    def find_matches(self, seq_hashes: Sequence[int]) -> dict[str, int]:
        """Same semantics as `KvIndex.find_matches`; expired blocks do not count."""
        self.expire()
        return self._owners.match(seq_hashes)

    def expire(self, now: float | None = None) -> int:
        """Drop entries whose expiry is <= now; returns how many (block, worker) pairs."""
        now = self._clock() if now is None else now
        queue = self._queue
        dropped = 0
        while queue and queue[0][0] <= now:
            expires, worker_id, hashes = queue.popleft()
            dropped += self._drop_expired(worker_id, hashes, expires)
        return dropped

    def _drop_expired(self, worker_id: str, hashes: tuple[int, ...], expires: float) -> int:
        held = self._expiry.get(worker_id)
        if not held:
            return 0
        # A block listed twice in one record must be dropped once: dedupe through the dict.
        due = [seq_hash for seq_hash in dict.fromkeys(hashes) if held.get(seq_hash) == expires]
        for seq_hash in due:
            del held[seq_hash]
        if due:
            self._owners.discard(due, self._owners.mask(worker_id))
        return len(due)

    def remove_worker(self, worker_id: str) -> None:
        """Forget a worker; its queued entries are skipped lazily when they come due."""
        held = self._expiry.pop(worker_id, None)
        if held:
            self._owners.discard(held, self._owners.mask(worker_id))
        self._owners.release(worker_id)

    @property
    def num_blocks(self) -> int:
        """Live (block, worker) pairs; expired entries are dropped first so the count is exact."""
        self.expire()
        return sum(len(held) for held in self._expiry.values())
