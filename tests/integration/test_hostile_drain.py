"""Shutdown and failure, as a client sees them, with real processes.

- SIGTERM to `lightspeed serve`: a stream longer than `--drain-timeout` ends with an in-band
  error event and `[DONE]` and a properly closed response (no broken chunked transfer); a short
  one finishes normally during the drain, and serve exits as soon as nothing is left to drain.
- A frontend whose own drain budget runs out (its worker still streaming) cuts the stream the
  same proper way, and answers a non-streamed request with a 503 JSON body.
- /health tells the truth at once: a SIGKILLed worker under serve leaves it within about a
  second (the supervisor removes its discovery entry), not after the discovery TTL; a worker the
  frontend failed to reach is listed with `healthy: false`, and with none healthy it is a 503.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import msgspec
import pytest

from lightspeed.config import FrontendConfig, PlaneConfig
from lightspeed.frontend.process import Frontend
from tests.integration.conftest import MODEL, Server, start_serve
from tests.polling import until

MOCKER = ["--engine", "mocker", "--num-gpu-blocks", "1024"]
WORKER_HEADER = "x-worker-instance-id"


def body(max_tokens: int, stream: bool = True) -> dict[str, object]:
    req: dict[str, object] = {"model": MODEL, "prompt": list(range(100, 132)), "max_tokens": max_tokens}
    req |= {"ignore_eos": True, "stream": stream}
    return req | ({"stream_options": {"include_usage": True}} if stream else {})


@dataclass
class Transcript:
    """An SSE response as read to its end: the data payloads in order, raw."""

    lines: list[str]

    @property
    def events(self) -> list[dict]:
        return [msgspec.json.decode(line) for line in self.lines if line != "[DONE]"]


async def read_stream(resp: aiohttp.ClientResponse, on_chunk: int, action: Callable[[], object]) -> Transcript:
    """Read every `data:` line until the response ends; call `action()` after `on_chunk` chunks.
    A response cut mid-transfer raises aiohttp.ClientPayloadError here, failing the test."""
    lines: list[str] = []
    async for raw in resp.content:
        line = raw.decode().strip()
        if line.startswith("data: "):
            lines.append(line[len("data: ") :])
            if len(lines) == on_chunk:
                action()
    return Transcript(lines)


def wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return -9


@pytest.fixture
def serve_procs() -> Iterator[list[Server]]:
    """Servers a test started; any still running at the end is killed."""
    servers: list[Server] = []
    yield servers
    for server in servers:
        if server.proc.poll() is None:
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait()


# ---------------------------------------------------------------- SIGTERM to serve


async def test_sigterm_past_the_drain_timeout_ends_the_stream_in_band(serve_procs: list[Server]) -> None:
    server = start_serve([*MOCKER, "--speedup-ratio", "0.1", "--drain-timeout", "1"], workers=1)
    serve_procs.append(server)
    sent: list[float] = []

    def sigterm() -> None:
        sent.append(time.monotonic())
        server.proc.send_signal(signal.SIGTERM)

    async with (
        aiohttp.ClientSession() as http,
        http.post(server.base_url + "/completions", json=body(2000)) as resp,
    ):
        assert resp.status == 200
        transcript = await read_stream(resp, on_chunk=3, action=sigterm)
    ended = time.monotonic() - sent[0]
    # The worker drained for 1 s, then cut the stream; the frontend said so, in-band, and ended it.
    assert transcript.lines[-1] == "[DONE]" and transcript.lines.count("[DONE]") == 1
    error = transcript.events[-1]["error"]
    assert error["type"] == "service_unavailable" and error["code"] is not None and error["message"]
    assert all("error" not in e for e in transcript.events[:-1]) and len(transcript.events) > 3
    assert 1.0 <= ended < 1.0 + 5.0  # after the drain, before the supervisor's grace ends
    assert wait_exit(server.proc, timeout=10) == 0


async def test_a_short_stream_finishes_normally_during_the_drain(serve_procs: list[Server]) -> None:
    server = start_serve([*MOCKER, "--speedup-ratio", "1"], workers=1)  # the default 10 s drain
    serve_procs.append(server)
    async with (
        aiohttp.ClientSession() as http,
        http.post(server.base_url + "/completions", json=body(300)) as resp,
    ):
        transcript = await read_stream(resp, on_chunk=1, action=lambda: server.proc.send_signal(signal.SIGTERM))
    finished = time.monotonic()
    events = transcript.events
    assert transcript.lines[-1] == "[DONE]" and all("error" not in e for e in events)
    assert [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]] == ["length"]
    assert events[-1]["usage"]["completion_tokens"] == 300
    # Nothing left to drain: serve exits now, not when the 10 s budget runs out.
    assert wait_exit(server.proc, timeout=10) == 0
    assert time.monotonic() - finished < 5.0


# ---------------------------------------------------------------- a frontend's own drain budget


def start_worker(discovery: Path, *extra: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "lightspeed", "worker", *MOCKER, "--discovery-path", str(discovery), *extra]
    return subprocess.Popen(cmd, start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.fixture
def discovery(tmp_path: Path) -> Path:
    return tmp_path / "discovery"


@pytest.fixture
def slow_worker(discovery: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A worker that would drain for 30 s: only the frontend's own budget can end its streams."""
    proc = start_worker(discovery, "--speedup-ratio", "0.1", "--drain-timeout", "30")
    yield proc
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture
async def frontend(discovery: Path, slow_worker: subprocess.Popen[bytes]) -> AsyncIterator[Frontend]:
    planes = PlaneConfig(discovery="file", discovery_path=str(discovery))
    front = Frontend(FrontendConfig(port=0, planes=planes, drain_timeout=0.5))
    await front.start()
    await until(lambda: len(front.models.all_workers()) == 1, what="the worker in discovery")
    yield front
    if not front.http.streams.closed:  # not stopped by the test itself
        await front.stop()


async def health(http: aiohttp.ClientSession, url: str) -> tuple[int, dict]:
    async with http.get(url + "/health") as resp:
        return resp.status, await resp.json()


async def test_a_frontend_past_its_drain_budget_cuts_streams_properly(frontend: Frontend) -> None:
    url = f"http://127.0.0.1:{frontend.port}/v1/completions"
    stopping: list[asyncio.Task[None]] = []
    started: list[float] = []

    def stop_frontend() -> None:
        started.append(time.monotonic())
        stopping.append(asyncio.create_task(frontend.stop()))

    async with aiohttp.ClientSession() as http:

        async def post_whole() -> tuple[int, dict]:
            async with http.post(url, json=body(2000, stream=False)) as resp:
                return resp.status, await resp.json()

        whole = asyncio.create_task(post_whole())
        await until(lambda: len(frontend.http.streams) == 1, what="the non-streamed request in flight")
        async with http.post(url, json=body(2000)) as resp:
            transcript = await read_stream(resp, on_chunk=3, action=stop_frontend)
        cut_after = time.monotonic() - started[0]
        status, payload = await whole
    await asyncio.wait_for(stopping[0], 10)
    assert status == 503 and payload["error"]["type"] == "service_unavailable"
    assert "shutting down" in payload["error"]["message"]
    assert transcript.lines[-1] == "[DONE]" and len(transcript.events) > 3
    error = transcript.events[-1]["error"]
    assert error["type"] == "service_unavailable" and "shutting down" in error["message"]
    assert 1.5 <= cut_after < 1.5 + 3.0  # its budget (0.5 s + the 1 s margin), not the worker's 30 s


# ---------------------------------------------------------------- /health


def healthy_ids(health: dict) -> list[str]:
    return sorted(w["instance_id"] for w in health.get("workers", []) if w["healthy"])


async def test_a_worker_killed_under_serve_leaves_health_at_once(serve_procs: list[Server]) -> None:
    # Liveness on and short: the healthy children heartbeat through serve's real loop (uvloop).
    server = start_serve([*MOCKER, "--liveness-timeout", "1"], workers=2)  # discovery ttl: 10 s
    serve_procs.append(server)
    before = {w["instance_id"]: w["pid"] for w in server.health()["workers"]}
    assert all(w["healthy"] for w in server.health()["workers"]) and server.health()["status"] == "healthy"
    victim, survivor = sorted(before)
    os.kill(before[victim], signal.SIGKILL)
    killed = time.monotonic()
    await until(lambda: victim not in healthy_ids(server.health()), timeout=10, interval=0.05, what="the kill")
    assert time.monotonic() - killed < 2.0  # the supervisor dropped its entry; the ttl is 10 s
    assert server.health()["status"] == "healthy" and survivor in healthy_ids(server.health())
    # The replacement joins; nothing else was restarted (liveness never fired on a live loop).
    await until(lambda: len(healthy_ids(server.health())) == 2, timeout=20, what="the replacement")
    after = {w["instance_id"]: w["pid"] for w in server.health()["workers"]}
    assert after[survivor] == before[survivor] and victim not in after
    assert wait_exit_after_sigterm(server) == 0


def wait_exit_after_sigterm(server: Server) -> int:
    server.proc.send_signal(signal.SIGTERM)
    return wait_exit(server.proc, timeout=20)


async def test_a_worker_the_frontend_cannot_reach_is_unhealthy_at_once(
    frontend: Frontend, slow_worker: subprocess.Popen[bytes]
) -> None:
    base = f"http://127.0.0.1:{frontend.port}"
    [card] = frontend.models.all_workers()
    async with aiohttp.ClientSession() as http:
        assert await health(http, base) == (
            200,
            {
                "status": "healthy",
                "models": [MODEL],
                "workers": [
                    {
                        "instance_id": card.instance_id,
                        "model": MODEL,
                        "address": card.address,
                        "role": "agg",
                        "pid": slow_worker.pid,
                        "healthy": True,
                    }
                ],
            },
        )
        os.kill(slow_worker.pid, signal.SIGKILL)  # no supervisor here: the entry stays for its ttl
        slow_worker.wait()
        async with http.post(base + "/v1/completions", json=body(2, stream=False)) as resp:
            assert resp.status == 503  # the dial failed: reported down
        status, report = await health(http, base)
    assert status == 503 and report["status"] == "unhealthy"
    assert [(w["instance_id"], w["healthy"]) for w in report["workers"]] == [(card.instance_id, False)]
