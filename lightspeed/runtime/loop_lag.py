"""How late an event loop runs its timers: the delay every coroutine on it sees beyond its due time.

A Python frontend streaming tens of thousands of tokens a second, or a worker doing heavy
bookkeeping, can saturate its loop long before it fails anything: requests just start later.
The monitor sleeps `interval` seconds over and over and records how much longer each sleep took;
its gauge (the largest lag since the last scrape) makes a CPU-bound process visible on /metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

DEFAULT_INTERVAL_S = 0.05


class LoopLagMonitor:
    def __init__(self, interval: float = DEFAULT_INTERVAL_S) -> None:
        if not interval > 0:
            raise ValueError(f"interval must be > 0, got {interval}")
        self.interval = interval
        self.total_lag = 0.0  # summed over every sample since start
        self.samples = 0
        self._max = 0.0
        self._task: asyncio.Task[None] | None = None

    def record(self, lag: float) -> None:
        lag = max(0.0, lag)
        self.total_lag += lag
        self.samples += 1
        self._max = max(self._max, lag)

    def take_max(self) -> float:
        """The largest lag since the previous call."""
        worst, self._max = self._max, 0.0
        return worst

    async def run(self) -> None:
        while True:
            started = time.perf_counter()
            await asyncio.sleep(self.interval)
            self.record(time.perf_counter() - started - self.interval)

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="loop-lag")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
