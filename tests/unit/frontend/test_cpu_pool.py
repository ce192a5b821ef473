"""The CPU pool: work runs off the loop, small jobs pass large ones, each lane refuses past its bound."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

import pytest

from lightspeed.errors import Overloaded
from lightspeed.frontend.cpu_pool import CpuPool, LaneLimits
from tests.polling import until

LIMITS = LaneLimits(small_job_chars=100, small_jobs=3, large_jobs=2)


@pytest.fixture
async def pool() -> AsyncIterator[CpuPool]:
    pool = CpuPool(LIMITS)
    yield pool
    pool.shutdown()


def blocked(gate: threading.Event, result: str) -> str:
    assert gate.wait(10), "the test never opened the gate"
    return result


async def test_jobs_run_in_another_thread(pool: CpuPool) -> None:
    assert await pool.run(1, threading.get_ident) != threading.get_ident()
    assert await pool.run(1000, threading.get_ident) != threading.get_ident()
    await until(lambda: pool.jobs() == (0, 0), timeout=5, what="the jobs to be counted done")


async def test_a_full_large_lane_refuses_and_small_jobs_still_run(pool: CpuPool) -> None:
    gate = threading.Event()
    large = [asyncio.create_task(pool.run(100, lambda i=i: blocked(gate, f"large{i}"))) for i in range(2)]
    await until(lambda: pool.jobs() == (0, 2), timeout=5, what="two large jobs admitted")
    with pytest.raises(Overloaded, match="busy tokenizing 2 large prompts") as refused:
        await pool.run(10_000, lambda: "never")
    assert refused.value.status == 503
    assert await pool.run(99, lambda: "small") == "small"  # its own thread: not behind the large ones
    gate.set()
    assert await asyncio.gather(*large) == ["large0", "large1"]
    await until(lambda: pool.jobs() == (0, 0), timeout=5, what="the lane to empty")
    assert await pool.run(100, lambda: "again") == "again"


async def test_a_cancelled_wait_keeps_its_running_job_counted(pool: CpuPool) -> None:
    gate, started = threading.Event(), threading.Event()

    def job() -> str:
        started.set()
        return blocked(gate, "done")

    waiter = asyncio.create_task(pool.run(100, job))
    await until(started.is_set, timeout=5, what="the job to start")
    waiter.cancel()  # the client went away; the thread is still tokenizing
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert pool.jobs() == (0, 1)
    gate.set()
    await until(lambda: pool.jobs() == (0, 0), timeout=5, what="the running job to finish")


async def test_a_cancelled_queued_job_never_runs_and_frees_its_place(pool: CpuPool) -> None:
    gate = threading.Event()
    ran: list[str] = []
    first = asyncio.create_task(pool.run(100, lambda: blocked(gate, "first")))
    queued = asyncio.create_task(pool.run(100, lambda: ran.append("queued")))
    await until(lambda: pool.jobs() == (0, 2), timeout=5, what="two large jobs admitted")
    queued.cancel()
    with pytest.raises(asyncio.CancelledError):
        await queued
    await until(lambda: pool.jobs() == (0, 1), timeout=5, what="the queued job to leave")
    gate.set()
    assert await first == "first"
    assert ran == []


async def test_exceptions_reach_the_caller(pool: CpuPool) -> None:
    def fails() -> None:
        raise ValueError("bad prompt")

    with pytest.raises(ValueError, match="bad prompt"):
        await pool.run(1, fails)
    await until(lambda: pool.jobs() == (0, 0), timeout=5, what="the failed job to be counted done")
