"""Where simulated time comes from: the wall clock, or a virtual one that only moves when slept.

The mocker sleeps by its timing model and the engine core measures steps against it. Both take
a `Clock`, so the same code runs a live fleet (`WallClock`) or a deterministic simulation in
which every sleep lasts exactly what was asked and bookkeeping takes no time unless a test says
so (`VirtualClock.advance`): step composition and first-token times can then be checked to the
last bit against hand-computed model times.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Monotonic seconds."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class WallClock:
    """`time.perf_counter` and `asyncio.sleep`."""

    def now(self) -> float:
        return time.perf_counter()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class VirtualClock:
    """Time stands still except in `sleep` (which moves it by exactly `seconds` and still yields
    to the event loop, as a real sleep would) and in `advance` (simulated CPU work)."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("time does not run backwards")
        self._now += seconds

    async def sleep(self, seconds: float) -> None:
        self.advance(max(0.0, seconds))
        await asyncio.sleep(0)


WALL_CLOCK = WallClock()
