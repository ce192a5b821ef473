"""Session affinity: requests carrying the same `x-session-id` go to the same worker.

An agent's or a chat's turns share a growing prefix; keeping them on one worker keeps that
prefix hot even in modes that do not see the KV cache. The first request of a session is routed
normally; the binding lasts `ttl` seconds after the session's last request, and is dropped when
its worker leaves.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class SessionAffinity:
    ttl: float = 600.0
    max_sessions: int = 100_000
    clock: Callable[[], float] = time.monotonic
    # Off: x-session-id is ignored (nothing is bound, nothing found) and every mode routes each
    # request on its own merits, as Dynamo 1.6.1 does: round-robin stays round-robin.
    enabled: bool = True
    _bound: OrderedDict[str, tuple[str, float]] = field(default_factory=OrderedDict)

    def __post_init__(self) -> None:
        if self.ttl <= 0:
            raise ValueError(f"session ttl must be > 0, got {self.ttl}")
        if self.max_sessions <= 0:
            raise ValueError(f"max_sessions must be > 0, got {self.max_sessions}")

    def lookup(self, session_id: str) -> str | None:
        """The worker bound to `session_id`, if the binding is still fresh."""
        if not self.enabled:
            return None
        hit = self._bound.get(session_id)
        if hit is None:
            return None
        worker, last = hit
        if self.clock() - last > self.ttl:
            del self._bound[session_id]
            return None
        return worker

    def bind(self, session_id: str, worker_id: str) -> None:
        if not self.enabled:
            return
        self._bound[session_id] = (worker_id, self.clock())
        self._bound.move_to_end(session_id)
        while len(self._bound) > self.max_sessions:  # oldest sessions go first
            self._bound.popitem(last=False)

    def remove_worker(self, worker_id: str) -> None:
        for sid in [s for s, (w, _) in self._bound.items() if w == worker_id]:
            del self._bound[sid]

    def __len__(self) -> int:
        return len(self._bound)
