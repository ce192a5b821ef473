"""`lightspeed serve --disagg 1P1D`: the pools as real processes, and a worker joining and
leaving the prefill pool at run time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import Server, start_serve, stop_serve

SECRET = {"LIGHTSPEED_CLUSTER_SECRET": "disagg-serve-test-secret"}
COMMON = ["--engine", "mocker", "--block-size", "16", "--num-gpu-blocks", "1024", "--speedup-ratio", "20"]


@pytest.fixture
def disagg_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Server, Path]]:
    for key, value in SECRET.items():
        monkeypatch.setenv(key, value)
    folder = tmp_path / "discovery"
    server = start_serve(
        [*COMMON, "--disagg", "1P1D", "--router-mode", "kv", "--discovery-path", str(folder)], workers=2
    )
    yield server, folder
    assert stop_serve(server) == 0


def post(server: Server, body: dict) -> dict:
    req = urllib.request.Request(
        server.base_url + "/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def roles(server: Server) -> list[str]:
    return sorted(w["role"] for w in server.health().get("workers", []))


def wait_for(predicate: object, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_serve_disagg_starts_both_pools_and_disaggregates(disagg_server: tuple[Server, Path]) -> None:
    server, _ = disagg_server
    assert roles(server) == ["decode", "prefill"]
    model = server.health()["workers"][0].get("model") or "HuggingFaceTB/SmolLM2-135M-Instruct"
    body = post(server, {"model": model, "prompt": list(range(100, 400)), "max_tokens": 5, "ignore_eos": True})
    assert body["usage"]["completion_tokens"] == 5
    assert 'lightspeed_frontend_disagg_decisions_total{reason="remote"} 1.0' in server.metrics()


def test_a_worker_joins_and_leaves_the_prefill_pool(disagg_server: tuple[Server, Path]) -> None:
    server, folder = disagg_server
    cmd = [sys.executable, "-m", "lightspeed", "worker", *COMMON, "--role", "prefill", "--discovery-path", str(folder)]
    proc = subprocess.Popen(cmd, start_new_session=True, env={**os.environ, **SECRET})
    try:
        wait_for(lambda: roles(server) == ["decode", "prefill", "prefill"], "a second prefill worker")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    wait_for(lambda: roles(server) == ["decode", "prefill"], "the prefill worker to leave")
