"""A client that disconnects mid-stream cancels its request in the worker and frees its KV."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable

import aiohttp

from tests.integration.conftest import MODEL, Server
from tests.polling import until


def worker_gauge(text: str, name: str) -> dict[str, float]:
    pattern = re.compile(rf'^{name}{{worker="([^"]+)"}} ([0-9.e+-]+)$', re.M)
    return {w: float(v) for w, v in pattern.findall(text)}


async def wait_for(
    server: Server, predicate: Callable[[dict[str, float], dict[str, float]], bool], timeout: float = 10.0
) -> dict[str, float]:
    """Poll the workers' running-request and active-block gauges until `predicate(running, active)`."""
    running: dict[str, float] = {}
    active: dict[str, float] = {}

    async def holds() -> bool:
        text = await asyncio.to_thread(server.metrics)
        running.clear()
        running.update(worker_gauge(text, "lightspeed_worker_requests_running"))
        active.clear()
        active.update(worker_gauge(text, "lightspeed_worker_kv_active_blocks"))
        return bool(running) and predicate(running, active)

    await until(holds, timeout=timeout, interval=0.1, what=lambda: f"worker gauges; last seen {running}, {active}")
    return active


async def test_disconnect_frees_blocks(mocker_server: Server) -> None:
    await wait_for(mocker_server, lambda r, a: sum(r.values()) == 0 and sum(a.values()) == 0)
    body = {
        "model": MODEL,
        "prompt": [300 + i for i in range(500)],
        "max_tokens": 7000,
        "ignore_eos": True,
        "stream": True,
    }
    session = aiohttp.ClientSession()
    resp = await session.post(mocker_server.base_url + "/completions", json=body)
    assert resp.status == 200
    chunks = 0
    async for line in resp.content:
        if line.startswith(b"data: "):
            chunks += 1
        if chunks >= 5:
            break
    # The request is running and holds KV blocks (prompt of 500 tokens = 8 blocks at least).
    active = await wait_for(mocker_server, lambda r, a: sum(r.values()) == 1 and sum(a.values()) >= 8)
    assert sum(active.values()) >= 8
    resp.close()  # drop the connection mid-stream
    await session.close()
    await wait_for(mocker_server, lambda r, a: sum(r.values()) == 0 and sum(a.values()) == 0)


async def test_many_disconnects_leave_nothing_behind(mocker_server: Server) -> None:
    async def one(i: int) -> None:
        body = {"model": MODEL, "prompt": [400 + i] * 200, "max_tokens": 5000, "ignore_eos": True, "stream": True}
        async with (
            aiohttp.ClientSession() as session,
            session.post(mocker_server.base_url + "/completions", json=body) as resp,
        ):
            async for line in resp.content:
                if line.startswith(b"data: "):
                    break

    await asyncio.gather(*(one(i) for i in range(16)))
    await wait_for(mocker_server, lambda r, a: sum(r.values()) == 0 and sum(a.values()) == 0)


async def test_workers_report_their_step_clock(mocker_server: Server) -> None:
    """Every mocker worker's modelled vs wall step time and lag reach the frontend's /metrics."""
    async with aiohttp.ClientSession() as session:
        body = {"model": MODEL, "prompt": "hello there", "max_tokens": 8}
        async with session.post(f"{mocker_server.url}/v1/completions", json=body) as resp:
            assert resp.status == 200

    async def reported() -> bool:
        text = await asyncio.to_thread(mocker_server.metrics)
        modelled = worker_gauge(text, "lightspeed_worker_step_modelled_seconds")
        wall = worker_gauge(text, "lightspeed_worker_step_wall_seconds")
        lag = worker_gauge(text, "lightspeed_worker_step_lag_max_seconds")
        loop_lag = "lightspeed_frontend_event_loop_lag_seconds " in text
        return (
            loop_lag and bool(modelled) and sum(modelled.values()) > 0 and wall.keys() == modelled.keys() == lag.keys()
        )

    await until(reported, timeout=10.0, interval=0.1, what="step clock gauges")
