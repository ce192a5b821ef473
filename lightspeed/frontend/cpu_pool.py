"""CPU-heavy request work (chat templating, tokenizing) off the event loop, bounded.

Tokenizing megabytes takes seconds; on the event loop that would stall every other client of the
frontend, health checks included. Here each job runs in a worker thread: the Rust tokenizer
releases the GIL while it encodes (its batch call does), and jinja templating, which holds it, is at least preempted
every switch interval, so the loop keeps answering.

Two lanes of one thread each, by the job's size in characters: small jobs (nearly all) never
queue behind large ones, and large ones cannot pile up: each lane admits a bounded number of
jobs (running + queued), and refuses the next with a 503 rather than queueing unbounded work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from lightspeed.errors import Overloaded

log = logging.getLogger(__name__)
_T = TypeVar("_T")

# A job under this many characters tokenizes in well under 50 ms: it goes to the small lane.
SMALL_JOB_CHARS = 32 * 1024
SMALL_LANE_JOBS = 256  # ~ seconds of queue at worst, and far more than a busy frontend needs
LARGE_LANE_JOBS = 4  # one running, three waiting: a flood of huge prompts gets 503s, not a queue


@dataclass(frozen=True, slots=True)
class LaneLimits:
    small_job_chars: int = SMALL_JOB_CHARS
    small_jobs: int = SMALL_LANE_JOBS
    large_jobs: int = LARGE_LANE_JOBS


class _Lane:
    def __init__(self, name: str, max_jobs: int) -> None:
        self.name = name
        self.max_jobs = max_jobs
        self.jobs = 0  # admitted and not yet finished (running or queued)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"cpu-{name}")


class CpuPool:
    """Runs `fn()` in a worker thread; a lane already full refuses the job with `Overloaded`."""

    def __init__(self, limits: LaneLimits = LaneLimits()) -> None:
        self.limits = limits
        self._small = _Lane("small", limits.small_jobs)
        self._large = _Lane("large", limits.large_jobs)

    def jobs(self) -> tuple[int, int]:
        """Jobs admitted and not finished: (small lane, large lane)."""
        return self._small.jobs, self._large.jobs

    async def run(self, size: int, fn: Callable[[], _T]) -> _T:
        lane = self._small if size < self.limits.small_job_chars else self._large
        if lane.jobs >= lane.max_jobs:
            raise Overloaded(f"the frontend is busy tokenizing {lane.jobs} {lane.name} prompts; retry later")
        loop = asyncio.get_running_loop()
        lane.jobs += 1
        job: Future[_T] = lane.executor.submit(fn)
        # Counted until the thread is done with it: a client that goes away cancels its wait,
        # not a job already running.
        job.add_done_callback(lambda _: _finished_soon(loop, lane))
        return await asyncio.wrap_future(job)

    def shutdown(self) -> None:
        for lane in (self._small, self._large):
            lane.executor.shutdown(wait=False, cancel_futures=True)


def _finished_soon(loop: asyncio.AbstractEventLoop, lane: _Lane) -> None:
    """From the worker thread: count the job finished on the loop's thread."""
    with contextlib.suppress(RuntimeError):  # the loop is already closed: nothing to count
        loop.call_soon_threadsafe(_finished, lane)


def _finished(lane: _Lane) -> None:
    lane.jobs -= 1
