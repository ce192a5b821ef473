"""No single client stalls the frontend: real `lightspeed serve` processes, hostile clients.

- A ~8 MB prompt (under the 8 MiB body limit) is refused with the context-length 400 at once
  (its length proves it cannot fit), and /health and a small completion answer meanwhile; a
  burst of large prompts that must be tokenized is tokenized off the event loop (bounded: past
  the pool's bound they get a 503), and /health keeps answering.
- A slowloris client (a request head one line at a time) and a connection that never sends a
  byte are closed after the header timeout; a body shorter than its Content-Length gets a 408
  after the body timeout; an idle keep-alive connection is closed after the keep-alive timeout.
- Past --max-connections, a new connection gets an HTTP 503 with an OpenAI error body; the
  frontend's RSS comes back down once 2,000 connections (each a request stalled mid-body) have
  gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.integration.conftest import MODEL, Server, start_serve, stop_serve
from tests.polling import until

BIG_PROMPT_CHARS = 7_900_000
CONTEXT = 8192  # SmolLM2's context: the mocker workers register it
HEALTH_BOUND_S = 2.0  # before: /health took ~9 s while an 8 MB prompt was tokenized
CAP = 2000
STALLED_POST = (
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    b'{"model": '
)
MOCKER = ["--engine", "mocker", "--speedup-ratio", "50", "--num-gpu-blocks", "1024"]


@pytest.fixture(scope="module")
def patient() -> Iterator[Server]:
    """Long HTTP timeouts (nothing times out by accident) and a cap of CAP connections."""
    server = start_serve([*MOCKER, "--max-connections", str(CAP), "--http-header-timeout", "60"], workers=1)
    yield server
    assert stop_serve(server) == 0


@pytest.fixture(scope="module")
def strict() -> Iterator[Server]:
    """One-second header and body timeouts, a two-second keep-alive."""
    timeouts = ["--http-header-timeout", "1", "--http-body-timeout", "1", "--http-keepalive-timeout", "2"]
    server = start_serve([*MOCKER, *timeouts], workers=1)
    yield server
    assert stop_serve(server) == 0


def post(server: Server, path: str, body: dict[str, object] | None, timeout: float = 60) -> tuple[int, dict, float]:
    """(status, JSON body, seconds) of one request (a GET without a body)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(server.url + path, data=data, headers={"Content-Type": "application/json"})
    start = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read()), time.monotonic() - start
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), time.monotonic() - start


def timed_get(server: Server, path: str) -> tuple[int, float]:
    start = time.monotonic()
    try:
        with urllib.request.urlopen(server.url + path, timeout=60) as resp:
            resp.read()
            return resp.status, time.monotonic() - start
    except urllib.error.HTTPError as err:
        return err.code, time.monotonic() - start


async def latencies_while(server: Server, busy: asyncio.Future[object]) -> list[float]:
    """/health latencies, one after another, until `busy` is done (at least one)."""
    seen: list[float] = []
    while not seen or not busy.done():
        status, seconds = await asyncio.to_thread(timed_get, server, "/health")
        assert status == 200
        seen.append(seconds)
    return seen


# ---------------------------------------------------------------- big prompts


async def test_an_8mb_prompt_is_refused_at_once_and_stalls_nobody(patient: Server) -> None:
    big = {"model": MODEL, "prompt": "hello world " * (BIG_PROMPT_CHARS // 12), "max_tokens": 1}
    refusal = asyncio.ensure_future(asyncio.to_thread(post, patient, "/v1/completions", big))
    health = await latencies_while(patient, refusal)
    small = await asyncio.to_thread(post, patient, "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 4})
    status, body, seconds = await refusal
    assert status == 400, body
    assert body["error"]["code"] == "context_length_exceeded" and body["error"]["param"] == "prompt"
    at_least = -(-BIG_PROMPT_CHARS // 81)  # 81: the bytes of SmolLM2's longest token
    assert body["error"]["message"] == (
        f"This model's maximum context length is {CONTEXT} tokens, but the prompt has at least {at_least} tokens."
    )
    assert seconds < 5, f"the refusal took {seconds:.1f}s (it was 8-12 s when the prompt was tokenized)"
    assert max(health) < HEALTH_BOUND_S, health
    assert small[0] == 200 and small[2] < HEALTH_BOUND_S, small


async def test_large_prompts_are_tokenized_off_the_loop_and_bounded(patient: Server) -> None:
    # Under the length bound (81 * 8192 characters), so each one is really tokenized: ~0.25 s of
    # CPU each; twenty of them on the event loop would hold /health for ~5 s.
    body = {"model": MODEL, "prompt": "hello world " * 55_000, "max_tokens": 1}
    with ThreadPoolExecutor(20) as pool:
        loop = asyncio.get_running_loop()
        flood = asyncio.gather(*(loop.run_in_executor(pool, post, patient, "/v1/completions", body) for _ in range(20)))
        health = await latencies_while(patient, flood)
        results = await flood
    statuses = sorted(status for status, _, _ in results)
    assert set(statuses) <= {400, 503}, results
    assert statuses.count(400) >= 1  # some were tokenized, and refused by their real count
    for status, error, _ in results:
        if status == 400:
            assert error["error"]["message"] == (
                f"This model's maximum context length is {CONTEXT} tokens, but the prompt has 110001 tokens."
            )
        else:
            assert error["error"]["message"].startswith("the frontend is busy tokenizing"), error
    assert max(health) < HEALTH_BOUND_S, health


# ---------------------------------------------------------------- slow clients


def seconds_until_closed(sock: socket.socket, drip: bytes | None = None, limit: float = 10) -> tuple[float, bytes]:
    """Seconds until the server closes `sock` (dripping `drip` every 0.2 s), and what it sent."""
    start, received = time.monotonic(), b""
    sock.settimeout(0.2)
    while time.monotonic() - start < limit:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            if drip is not None:
                with contextlib.suppress(OSError):
                    sock.sendall(drip)
            continue
        except ConnectionResetError:
            break
        if not chunk:
            break
        received += chunk
    return time.monotonic() - start, received


def connect(server: Server) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)))


async def test_a_slowloris_head_is_cut_after_the_header_timeout(strict: Server) -> None:
    with connect(strict) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        seconds, received = await asyncio.to_thread(seconds_until_closed, sock, b"X-Slow: 1\r\n")
    assert 0.9 < seconds < 2.5 and received == b""


async def test_a_silent_connection_is_closed_after_the_header_timeout(strict: Server) -> None:
    with connect(strict) as sock:
        seconds, received = await asyncio.to_thread(seconds_until_closed, sock)
    assert 0.9 < seconds < 2.5 and received == b""


async def test_a_body_shorter_than_its_content_length_gets_a_408(strict: Server) -> None:
    with connect(strict) as sock:
        head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
        sock.sendall(head + b'{"model": ')
        seconds, received = await asyncio.to_thread(seconds_until_closed, sock)
    status_line, _, rest = received.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 408 Request Timeout"
    error = json.loads(rest.partition(b"\r\n\r\n")[2])["error"]
    assert error == {
        "message": "the request body did not arrive within 1s",
        "type": "invalid_request_error",
        "param": None,
        "code": 408,
    }
    assert 0.9 < seconds < 2.5  # answered, and closed, one body timeout after the head


async def test_an_idle_keep_alive_connection_is_closed_after_its_timeout(strict: Server) -> None:
    with connect(strict) as sock:
        sock.sendall(b"GET /live HTTP/1.1\r\nHost: x\r\n\r\n")
        seconds, received = await asyncio.to_thread(seconds_until_closed, sock)
    assert received.startswith(b"HTTP/1.1 200 OK\r\n") and received.endswith(b'{"status": "live"}')
    assert 1.9 < seconds < 3.5  # the keep-alive timeout (2 s), not the header timeout (1 s)


async def test_a_kept_alive_connection_serves_requests_within_the_timeouts(strict: Server) -> None:
    with connect(strict) as sock:
        for _ in range(3):  # each request resets the clock: 3 x 0.6 s outlives every timeout
            sock.sendall(b"GET /live HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = sock.recv(65536)
            assert reply.startswith(b"HTTP/1.1 200 OK\r\n"), reply
            await asyncio.sleep(0.6)


# ---------------------------------------------------------------- the connection cap and memory


def frontend_pid(server: Server) -> int:
    for task in Path(f"/proc/{server.proc.pid}/task").iterdir():
        for pid in (task / "children").read_text().split():
            if b"frontend" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:5]:
                return int(pid)
    raise AssertionError("no frontend process under serve")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


async def test_connections_past_the_cap_get_a_503_and_memory_comes_back(patient: Server) -> None:
    pid = frontend_pid(patient)
    for _ in range(20):  # warm: the allocations of serving requests at all are not the sockets'
        assert timed_get(patient, "/health")[0] == 200
    before = rss_mb(pid)
    idle = [connect(patient) for _ in range(CAP)]
    for sock in idle:  # each one a request in progress, waiting for the rest of its body
        sock.sendall(STALLED_POST)
    try:
        await until(lambda: timed_get(patient, "/health")[0] == 503, timeout=20, what="the cap to be reached")
        status, error, _ = await asyncio.to_thread(post, patient, "/v1/models", None)
        assert status == 503
        assert error["error"] == {
            "message": f"too many open connections (the cap is {CAP}); retry later",
            "type": "service_unavailable",
            "param": None,
            "code": 503,
        }
        during = rss_mb(pid)
    finally:
        for sock in idle:
            sock.close()
    await until(lambda: timed_get(patient, "/health")[0] == 200, timeout=20, what="connections to be accepted again")
    grown = during - before
    assert grown > 10, f"{CAP} stalled connections grew the frontend by only {grown:.1f} MB: measure again"
    await until(
        lambda: rss_mb(pid) - before < grown / 2,
        timeout=10,
        what=lambda: f"RSS back near {before:.1f} MB (at {during:.1f} with the connections, now {rss_mb(pid):.1f})",
    )
