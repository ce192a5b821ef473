"""In-flight load per worker, as seen by one router (and its replicas).

Load is added when a request is routed, its prefill tokens are dropped at the first token, and
everything is released when the stream ends. Entries older than `stale_after` are expired so a
lost "free" (a crashed stream handler) cannot pin load on a worker forever.

Decode load is counted in *unique* KV blocks: requests sharing a prefix on one worker share its
blocks there, so each worker keeps a refcount per sequence hash of its active requests (plus the
trailing partial blocks, which are never shared). That is Dynamo's `active_unique_blocks`.

For the predicted-latency cost each worker also keeps how many requests still await their first
token and when it last made visible prefill progress (`prefill_since`: when its prefill queue
went from empty to non-empty, or its latest first token). Engines prefill first come, first
served, so the time since then says how much of the queued prefill is probably done already.

Listeners hear every local change so router replicas can mirror it (see `replica_sync`); changes
applied *from* a replica pass `notify=False` so they are not echoed back.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field


@dataclass(slots=True)
class _Entry:
    worker_id: str
    prefill_tokens: int
    hashes: tuple[int, ...]
    extra_blocks: int  # blocks not named by a hash (the partial tail), never shared
    started: float


@dataclass(slots=True)
class WorkerLoad:
    requests: int = 0
    prefill_tokens: int = 0
    extra_blocks: int = 0
    refs: dict[int, int] = field(default_factory=dict)  # sequence hash -> active requests using it
    prefill_requests: int = 0  # requests still waiting for their first token
    prefill_since: float = 0.0  # clock of the last prefill progress seen (see the module docstring)

    @property
    def decoding_requests(self) -> int:
        """Requests past their first token: each takes one token of every step's budget."""
        return self.requests - self.prefill_requests

    @property
    def blocks(self) -> int:
        """Active decode blocks, each shared prefix block counted once."""
        return len(self.refs) + self.extra_blocks

    def new_blocks(self, hashes: Sequence[int] | AbstractSet[int]) -> int:
        """How many of `hashes` (distinct) are not active on this worker yet."""
        if not self.refs:
            return len(hashes)
        # A keys view & a set intersects in C, walking the smaller side: the router's hot path.
        return len(hashes) - len(self.refs.keys() & (hashes if isinstance(hashes, AbstractSet) else set(hashes)))


@dataclass(frozen=True, slots=True)
class LoadChange:
    """One change to the active set, as broadcast to router replicas."""

    kind: str  # "add" | "prefill_done" | "free"
    request_id: str
    worker_id: str = ""
    prefill_tokens: int = 0
    hashes: tuple[int, ...] = ()
    extra_blocks: int = 0


LoadListener = Callable[[LoadChange], None]


@dataclass
class ActiveLoad:
    stale_after: float = 300.0
    clock: Callable[[], float] = time.monotonic
    listeners: list[LoadListener] = field(default_factory=list)
    # Called whenever load goes down (local or mirrored): the admission queue re-checks then.
    on_release: list[Callable[[], None]] = field(default_factory=list)
    _entries: dict[str, _Entry] = field(default_factory=dict)
    _load: dict[str, WorkerLoad] = field(default_factory=dict)
    # sequence hash -> workers where some active request holds it: lets the router count a
    # prompt's already-active blocks per worker in one pass over the prompt, not one per worker.
    _holders: dict[int, set[str]] = field(default_factory=dict)

    def add(
        self,
        request_id: str,
        worker_id: str,
        prefill_tokens: int,
        blocks: int = 0,
        hashes: Sequence[int] = (),
        *,
        notify: bool = True,
    ) -> None:
        """Track a routed request; `blocks` is its total block count (>= len(hashes))."""
        if request_id in self._entries:
            self.free(request_id, notify=False)
        hashes = tuple(hashes)
        extra = max(0, blocks - len(hashes))
        self._entries[request_id] = _Entry(worker_id, prefill_tokens, hashes, extra, self.clock())
        load = self._load.setdefault(worker_id, WorkerLoad())
        load.requests += 1
        if prefill_tokens > 0:
            if load.prefill_tokens <= 0:
                load.prefill_since = self.clock()  # an idle prefill queue starts now
            load.prefill_tokens += prefill_tokens
            load.prefill_requests += 1
        load.extra_blocks += extra
        refs, holders = load.refs, self._holders
        for h in hashes:
            n = refs.get(h, 0)
            refs[h] = n + 1
            if n == 0:
                holders.setdefault(h, set()).add(worker_id)
        if notify:
            self._emit(LoadChange("add", request_id, worker_id, prefill_tokens, hashes, extra))

    def prefill_done(self, request_id: str, *, notify: bool = True) -> None:
        entry = self._entries.get(request_id)
        if entry is None or entry.prefill_tokens == 0:
            return
        self._drop_prefill(self._load[entry.worker_id], entry)
        if notify:
            self._emit(LoadChange("prefill_done", request_id))
        self._released()

    def free(self, request_id: str, *, notify: bool = True) -> None:
        entry = self._entries.pop(request_id, None)
        if entry is None:
            return
        load = self._load[entry.worker_id]
        load.requests -= 1
        if entry.prefill_tokens:
            self._drop_prefill(load, entry)
        load.extra_blocks -= entry.extra_blocks
        refs = load.refs
        for h in entry.hashes:
            left = refs[h] - 1
            if left:
                refs[h] = left
            else:
                del refs[h]
                self._drop_holder(h, entry.worker_id)
        if notify:
            self._emit(LoadChange("free", request_id))
        self._released()

    def apply(self, change: LoadChange) -> None:
        """Mirror a replica's change (not re-broadcast)."""
        if change.kind == "add":
            self.add(
                change.request_id,
                change.worker_id,
                change.prefill_tokens,
                len(change.hashes) + change.extra_blocks,
                change.hashes,
                notify=False,
            )
        elif change.kind == "prefill_done":
            self.prefill_done(change.request_id, notify=False)
        elif change.kind == "free":
            self.free(change.request_id, notify=False)
        else:
            raise ValueError(f"unknown load change kind {change.kind!r}")

    def active_overlap(self, hashes: Sequence[int]) -> dict[str, int]:
        """worker -> how many of `hashes` (distinct) its active requests already hold."""
        counts: dict[str, int] = {}
        holders = self._holders
        for h in hashes:
            workers = holders.get(h)
            if workers:
                for w in workers:
                    counts[w] = counts.get(w, 0) + 1
        return counts

    def _drop_prefill(self, load: WorkerLoad, entry: _Entry) -> None:
        """A first token (or an early end): the worker has just finished a prefill."""
        load.prefill_tokens -= entry.prefill_tokens
        load.prefill_requests -= 1
        load.prefill_since = self.clock()
        entry.prefill_tokens = 0

    def _drop_holder(self, h: int, worker_id: str) -> None:
        workers = self._holders.get(h)
        if workers is not None:
            workers.discard(worker_id)
            if not workers:
                del self._holders[h]

    def get(self, worker_id: str) -> WorkerLoad:
        return self._load.get(worker_id) or WorkerLoad()

    def remove_worker(self, worker_id: str) -> None:
        for rid in [r for r, e in self._entries.items() if e.worker_id == worker_id]:
            self.free(rid, notify=False)
        load = self._load.pop(worker_id, None)
        for h in list(load.refs) if load is not None else []:
            self._drop_holder(h, worker_id)

    def expire(self, now: float | None = None) -> int:
        """Drop entries older than `stale_after`; returns how many were dropped."""
        cutoff = (self.clock() if now is None else now) - self.stale_after
        stale = [rid for rid, e in self._entries.items() if e.started < cutoff]
        for rid in stale:
            self.free(rid, notify=False)  # every replica expires on its own clock
        return len(stale)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._entries

    @property
    def total_requests(self) -> int:
        return len(self._entries)

    def _emit(self, change: LoadChange) -> None:
        for listener in self.listeners:
            listener(change)

    def _released(self) -> None:
        for callback in self.on_release:
            callback()
