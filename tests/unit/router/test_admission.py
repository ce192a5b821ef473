from __future__ import annotations

import asyncio

import pytest

from lightspeed.errors import Overloaded
from lightspeed.router.admission import AdmissionConfig, AdmissionQueue
from tests.polling import until


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="policy"):
        AdmissionConfig(policy="lifo")
    with pytest.raises(ValueError):
        AdmissionConfig(max_size=-1)


async def _admitted_order(policy: str, jobs: list[tuple[str, int]]) -> list[str]:
    q = AdmissionQueue(AdmissionConfig(policy=policy))
    order: list[str] = []

    async def waiter(rid: str, size: int) -> None:
        await q.wait(q.ticket(rid, size))
        order.append(rid)

    tasks = [asyncio.create_task(waiter(rid, size)) for rid, size in jobs]
    await until(lambda: len(q) == len(jobs), timeout=2, interval=0.001, what="every job queued")
    for admitted in range(1, len(jobs) + 1):
        q.wake()  # one wake admits exactly one job, the one the policy puts first
        await until(lambda n=admitted: len(order) == n, timeout=2, interval=0.001, what="an admission")
    await asyncio.gather(*tasks)
    return order


async def test_fcfs_admits_in_arrival_order() -> None:
    assert await _admitted_order("fcfs", [("a", 900), ("b", 10), ("c", 500)]) == ["a", "b", "c"]


async def test_wspt_admits_shortest_job_first() -> None:
    assert await _admitted_order("wspt", [("a", 900), ("b", 10), ("c", 500), ("d", 10)]) == ["b", "d", "c", "a"]


async def test_requeued_waiter_keeps_its_place() -> None:
    q = AdmissionQueue(AdmissionConfig(policy="fcfs"))
    first = q.ticket("first", 0)
    second = q.ticket("second", 0)
    t2 = asyncio.create_task(q.wait(second))
    t1 = asyncio.create_task(q.wait(first))
    await until(lambda: len(q) == 2, timeout=2, interval=0.001, what="both waiting")
    q.wake()  # wakes "first" (older ticket) though it queued later
    await until(t1.done, timeout=2, interval=0.001, what="the older ticket admitted")
    assert not t2.done()
    q.wake()
    await t2


async def test_full_queue_refuses_and_timeout_raises() -> None:
    q = AdmissionQueue(AdmissionConfig(max_size=1, max_wait_s=0.05))
    t = asyncio.create_task(q.wait(q.ticket("a", 0)))
    await until(lambda: len(q) == 1, timeout=2, interval=0.001, what="a queued")
    with pytest.raises(Overloaded, match="already queued"):
        await q.wait(q.ticket("b", 0))
    with pytest.raises(Overloaded, match="waited"):
        await t
    assert len(q) == 0
