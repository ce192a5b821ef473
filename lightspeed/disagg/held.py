"""Prefill side: KV blocks pinned for a transfer, each released once, on time at the latest.

A decode worker releases the blocks it pulled (`kv_release`, or the channel's ack). One that dies
mid-transfer never does, so every pinned transfer has a deadline; a reaper frees what is past it,
and block counts return to idle instead of leaking a dead peer's share of the cache.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Held:
    request_id: str  # the engine's key for the held blocks
    deadline: float
    num_blocks: int


class HeldTransfers:
    """transfer id -> pinned blocks. `release_blocks(transfer_id, request_id)` frees them (in the
    engine, and in the channel that serves them)."""

    def __init__(
        self,
        release_blocks: Callable[[str, str], object],
        timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"kv_transfer_timeout must be > 0; got {timeout_s}")
        self._release_blocks = release_blocks
        self.timeout_s = timeout_s
        self._clock = clock
        self._held: dict[str, _Held] = {}
        self.num_released = 0
        self.num_expired = 0

    def __len__(self) -> int:
        return len(self._held)

    def __contains__(self, transfer_id: object) -> bool:
        return transfer_id in self._held

    def add(self, transfer_id: str, request_id: str, num_blocks: int) -> None:
        if transfer_id in self._held:
            raise ValueError(f"transfer {transfer_id!r} is already held")
        self._held[transfer_id] = _Held(request_id, self._clock() + self.timeout_s, num_blocks)

    def release(self, transfer_id: str) -> bool:
        """Free a transfer's blocks; False if it is unknown or already released."""
        held = self._held.pop(transfer_id, None)
        if held is None:
            return False
        self._release_blocks(transfer_id, held.request_id)
        self.num_released += 1
        return True

    def expire(self) -> list[str]:
        """Release every transfer past its deadline; returns their ids."""
        now = self._clock()
        expired = [tid for tid, held in self._held.items() if held.deadline <= now]
        for tid in expired:
            held = self._held[tid]
            log.warning(
                "KV transfer %s not pulled within %.1fs; releasing its %d blocks", tid, self.timeout_s, held.num_blocks
            )
            self.release(tid)
            self.num_expired += 1
        return expired

    def release_all(self) -> None:
        for tid in list(self._held):
            self.release(tid)

    async def reap(self, interval_s: float | None = None) -> None:
        """Run `expire` periodically (a task of the worker; cancel it to stop)."""
        interval = interval_s if interval_s is not None else min(1.0, self.timeout_s / 4)
        while True:
            await asyncio.sleep(interval)
            self.expire()
