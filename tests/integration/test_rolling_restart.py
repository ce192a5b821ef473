"""A rolling restart of every worker under load fails no client request.

Separate processes, as an orchestrator runs them: one frontend and two mocker workers on file
discovery with a cluster secret. While clients stream continuously, each worker in turn gets a
replacement (which must pass its /health probe first), then SIGTERM: it leaves discovery at once,
finishes its in-flight streams, refuses new ones with a retryable error that the frontend re-sends
elsewhere, and exits 0. Every request must complete with exactly its `max_tokens` tokens.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.integration.conftest import CLUSTER_SECRET, MODEL, free_port
from tests.polling import until

MAX_TOKENS = 24


class Fleet:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.procs: list[subprocess.Popen[bytes]] = []
        common = ["--discovery-path", str(folder), "--cluster-secret", CLUSTER_SECRET]
        self.common = common
        self.frontend = self._spawn(["frontend", "--port", str(self.port), *common])

    def _spawn(self, args: list[str]) -> subprocess.Popen[bytes]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen([sys.executable, "-m", "lightspeed", *args], start_new_session=True, env=env)
        self.procs.append(proc)
        return proc

    def worker(self) -> tuple[subprocess.Popen[bytes], int]:
        probe = free_port()
        args = ["worker", "--engine", "mocker", "--speedup-ratio", "4", "--num-gpu-blocks", "1024"]
        args += ["--health-port", str(probe), "--drain-timeout", "20", *self.common]
        return self._spawn(args), probe

    def workers(self) -> list[dict[str, object]]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                return list(json.loads(r.read())["workers"])
        except (OSError, ValueError):
            return []


def probe_ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(tmp_path)
    yield f
    for proc in f.procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


async def client_loop(url: str, stop: asyncio.Event, results: list[int], errors: list[str]) -> None:
    body = {"model": MODEL, "prompt": "roll on", "max_tokens": MAX_TOKENS, "ignore_eos": True, "stream": True}
    body["stream_options"] = {"include_usage": True}
    async with aiohttp.ClientSession() as http:
        while not stop.is_set():
            try:
                async with http.post(url + "/v1/completions", json=body) as resp:
                    if resp.status != 200:
                        errors.append(f"{resp.status}: {await resp.text()}")
                        continue
                    usage = None
                    async for raw in resp.content:
                        line = raw.decode().strip()
                        if line.startswith("data: {"):
                            event = json.loads(line[6:])
                            if "error" in event:
                                errors.append(str(event["error"]))
                            usage = event.get("usage") or usage
                    results.append(int(usage["completion_tokens"]) if usage else -1)
            except aiohttp.ClientError as err:
                errors.append(repr(err))


async def test_rolling_restart_of_every_worker_fails_no_request(fleet: Fleet) -> None:
    old = [fleet.worker() for _ in range(2)]
    await until(lambda: len(fleet.workers()) == 2, timeout=60)
    stop, results, errors = asyncio.Event(), [], []
    url = f"http://127.0.0.1:{fleet.port}"
    clients = [asyncio.create_task(client_loop(url, stop, results, errors)) for _ in range(4)]
    try:
        await asyncio.sleep(1.0)
        for proc, _ in old:
            _new, probe = fleet.worker()
            await until(lambda probe=probe: probe_ready(probe), timeout=60)  # surge first
            await until(lambda: len(fleet.workers()) == 3, timeout=30)
            served_before = len(results)
            proc.send_signal(signal.SIGTERM)
            started = time.monotonic()
            assert await asyncio.to_thread(proc.wait, 40) == 0
            assert time.monotonic() - started < 30
            await until(lambda: len(fleet.workers()) == 2, timeout=30)
            await until(lambda n=served_before: len(results) >= n + 8, timeout=30)  # traffic flows on
    finally:
        stop.set()
        await asyncio.gather(*clients)
    assert errors == []
    assert len(results) >= 20
    assert set(results) == {MAX_TOKENS}
