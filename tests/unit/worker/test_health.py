"""Worker probes: /live always answers, /health follows the worker's state."""

from __future__ import annotations

import aiohttp
import pytest

from lightspeed.worker.health import HealthServer, WorkerState


async def test_probes_follow_the_state() -> None:
    state: list[WorkerState] = ["starting"]
    server = HealthServer("127.0.0.1", 0, lambda: state[0])
    port = await server.start()
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
            for current, code in (("starting", 503), ("ready", 200), ("draining", 503)):
                state[0] = current
                async with http.get("/health") as r:
                    assert (r.status, await r.json()) == (code, {"status": current})
                async with http.get("/live") as r:
                    assert r.status == 200
            async with http.get("/generate") as r:
                assert r.status == 404
    finally:
        await server.stop()


def test_bad_port() -> None:
    with pytest.raises(ValueError, match="health port"):
        HealthServer("127.0.0.1", 70000, lambda: "ready")
