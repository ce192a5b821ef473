"""In-flight load per worker, as seen by one router.

Load is added when a request is routed, its prefill tokens are dropped at the first token, and
everything is released when the stream ends. Entries older than `stale_after` are expired so a
lost "free" (a crashed stream handler) cannot pin load on a worker forever.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(slots=True)
class _Entry:
    worker_id: str
    prefill_tokens: int
    blocks: int
    started: float


@dataclass(slots=True)
class WorkerLoad:
    requests: int = 0
    prefill_tokens: int = 0
    blocks: int = 0


@dataclass
class ActiveLoad:
    stale_after: float = 300.0
    _entries: dict[str, _Entry] = field(default_factory=dict)
    _load: dict[str, WorkerLoad] = field(default_factory=dict)

    def add(self, request_id: str, worker_id: str, prefill_tokens: int, blocks: int = 0) -> None:
        if request_id in self._entries:
            self.free(request_id)
        self._entries[request_id] = _Entry(worker_id, prefill_tokens, blocks, time.monotonic())
        load = self._load.setdefault(worker_id, WorkerLoad())
        load.requests += 1
        load.prefill_tokens += prefill_tokens
        load.blocks += blocks

    def prefill_done(self, request_id: str) -> None:
        entry = self._entries.get(request_id)
        if entry is None or entry.prefill_tokens == 0:
            return
        self._load[entry.worker_id].prefill_tokens -= entry.prefill_tokens
        entry.prefill_tokens = 0

    def free(self, request_id: str) -> None:
        entry = self._entries.pop(request_id, None)
        if entry is None:
            return
        load = self._load[entry.worker_id]
        load.requests -= 1
        load.prefill_tokens -= entry.prefill_tokens
        load.blocks -= entry.blocks

    def get(self, worker_id: str) -> WorkerLoad:
        return self._load.get(worker_id, WorkerLoad())

    def remove_worker(self, worker_id: str) -> None:
        for rid in [r for r, e in self._entries.items() if e.worker_id == worker_id]:
            self.free(rid)
        self._load.pop(worker_id, None)

    def expire(self, now: float | None = None) -> int:
        """Drop entries older than `stale_after`; returns how many were dropped."""
        cutoff = (time.monotonic() if now is None else now) - self.stale_after
        stale = [rid for rid, e in self._entries.items() if e.started < cutoff]
        for rid in stale:
            self.free(rid)
        return len(stale)

    @property
    def total_requests(self) -> int:
        return len(self._entries)
