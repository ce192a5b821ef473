"""Fixtures that run the real `lightspeed serve` as a subprocess on loopback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def health(self) -> dict:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                return json.loads(r.read())
        except Exception as err:  # 503 while no workers, or not up yet
            body = getattr(err, "read", lambda: b"{}")()
            try:
                return json.loads(body or b"{}")
            except ValueError:
                return {}

    def metrics(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as r:
            return r.read().decode()


def start_serve(args: list[str], workers: int, timeout: float = 120.0) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "lightspeed", "serve", "--port", str(port), "--workers", str(workers), *args]
    proc = subprocess.Popen(cmd, start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    server = Server(f"http://127.0.0.1:{port}", proc)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"lightspeed serve exited with {proc.returncode}")
        if len(server.health().get("workers", [])) >= workers:
            return server
        time.sleep(0.2)
    stop_serve(server)
    raise RuntimeError("lightspeed serve did not become ready")


def stop_serve(server: Server) -> int:
    server.proc.send_signal(signal.SIGTERM)
    try:
        return server.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait()
        return -9


MOCKER_ARGS = ["--engine", "mocker", "--max-body-bytes", str(256 * 1024), "--router-mode", "round-robin"]


@pytest.fixture(scope="session")
def mocker_server() -> Iterator[Server]:
    """Two mocker workers at a speedup where a long generation takes about a second."""
    server = start_serve([*MOCKER_ARGS, "--speedup-ratio", "20", "--num-gpu-blocks", "2048"], workers=2)
    yield server
    assert stop_serve(server) == 0


# float32: the expected texts are fp32 greedy outputs, and `--dtype auto` picks bf16 on CPUs
# where it is faster (native/dtype_choice.py).
NATIVE_ARGS = ["--engine", "native", "--kv-cache-gb", "0.5", "--dtype", "float32"]


@pytest.fixture(scope="session")
def native_server() -> Iterator[Server]:
    """One native worker (the real SmolLM2), shared by every native test module: starting it
    costs several seconds of model loading, so it is done once per session."""
    server = start_serve(NATIVE_ARGS, workers=1, timeout=300)
    yield server
    assert stop_serve(server) == 0
