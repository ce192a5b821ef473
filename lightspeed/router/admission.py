"""Admission queue: where requests wait while every worker is busy.

A waiter is woken whenever load is released anywhere (a first token, a finished stream); it
re-checks and, if workers are still busy, goes back in its original place. Order:
  fcfs  arrival order
  wspt  weighted shortest processing time: the smallest job (uncached prompt tokens) first,
        which minimises mean waiting time; arrival order breaks ties
Past `max_size` waiters a new request is refused at once (503) rather than queued without bound.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from dataclasses import dataclass, field

from lightspeed.config import QUEUE_POLICIES
from lightspeed.errors import Overloaded


@dataclass(frozen=True, slots=True)
class AdmissionConfig:
    policy: str = "fcfs"
    max_size: int = 1024
    max_wait_s: float = 60.0

    def __post_init__(self) -> None:
        if self.policy not in QUEUE_POLICIES:
            raise ValueError(f"queue policy must be one of {', '.join(QUEUE_POLICIES)}; got {self.policy!r}")
        if self.max_size < 0:
            raise ValueError(f"admission queue max_size must be >= 0, got {self.max_size}")
        if self.max_wait_s <= 0:
            raise ValueError(f"admission max_wait_s must be > 0, got {self.max_wait_s}")


@dataclass(order=True, slots=True)
class Ticket:
    priority: tuple[float, int]
    request_id: str = field(compare=False)
    future: asyncio.Future[None] | None = field(default=None, compare=False)


class AdmissionQueue:
    def __init__(self, cfg: AdmissionConfig) -> None:
        self.cfg = cfg
        self._heap: list[Ticket] = []
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._heap)

    def ticket(self, request_id: str, job_size: int) -> Ticket:
        """A place in line, fixed at arrival so a re-queued waiter keeps it."""
        key = float(job_size) if self.cfg.policy == "wspt" else 0.0
        return Ticket((key, next(self._seq)), request_id)

    async def wait(self, ticket: Ticket) -> None:
        """Wait until woken (a release) with this ticket at the head; raises Overloaded when full."""
        if len(self._heap) >= self.cfg.max_size:
            raise Overloaded(f"all workers are busy and {len(self._heap)} requests are already queued")
        ticket.future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._heap, ticket)
        try:
            await asyncio.wait_for(asyncio.shield(ticket.future), self.cfg.max_wait_s)
        except TimeoutError:
            raise Overloaded(f"request waited {self.cfg.max_wait_s:.0f}s for a free worker") from None
        finally:
            if not ticket.future.done():
                ticket.future.cancel()
            self._discard(ticket)

    def wake(self) -> None:
        """Wake the head waiter (called when load is released)."""
        while self._heap:
            head = heapq.heappop(self._heap)
            if head.future is not None and not head.future.done():
                head.future.set_result(None)
                return

    def _discard(self, ticket: Ticket) -> None:
        try:
            self._heap.remove(ticket)
        except ValueError:
            return
        heapq.heapify(self._heap)
