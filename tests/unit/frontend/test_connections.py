"""The connection guard in-process: the cap's 503, header and body timeouts, heap release, fd limit."""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web

from lightspeed.frontend import connections
from lightspeed.frontend.connections import ConnectionGuard, GuardedSite, HttpLimits, fit_to_fd_limit
from tests.polling import until

CAP = 3
Served = tuple[ConnectionGuard, int]
Serve = Callable[[float], Awaitable[Served]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Start apps behind guards (cap 3, the given header and body timeout); stop them after."""
    runners: list[web.AppRunner] = []

    async def start(timeout: float) -> Served:
        guard = ConnectionGuard(HttpLimits(header_timeout=timeout, body_timeout=timeout, max_connections=CAP))
        app = web.Application(middlewares=[guard.middleware])
        app.add_routes([web.post("/echo", echo), web.get("/live", live)])
        runner = web.AppRunner(app, keepalive_timeout=30)
        await runner.setup()
        runners.append(runner)
        await GuardedSite(runner, "127.0.0.1", 0, guard, reuse_port=False, backlog=16).start()
        return guard, runner.addresses[0][1]

    yield start
    for runner in runners:
        await runner.cleanup()


async def echo(request: web.Request) -> web.Response:
    return web.Response(body=await request.read())


async def live(request: web.Request) -> web.Response:
    return web.Response(text="live")


async def closed_after(reader: asyncio.StreamReader) -> tuple[float, bytes]:
    loop = asyncio.get_running_loop()
    start = loop.time()
    data = await asyncio.wait_for(reader.read(), 5)
    return loop.time() - start, data


async def test_past_the_cap_a_connection_gets_the_503_and_is_closed(serve: Serve) -> None:
    guard, port = await serve(30)
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(CAP)]
    await until(lambda: guard.open == CAP, timeout=5, what="three open connections")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /live HTTP/1.1\r\nHost: x\r\n\r\n")
    _, reply = await closed_after(reader)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.split(b"\r\n") == [
        b"HTTP/1.1 503 Service Unavailable",
        b"Content-Type: application/json",
        f"Content-Length: {len(body)}".encode(),
        b"Retry-After: 1",
        b"Connection: close",
    ]
    assert json.loads(body) == {
        "error": {
            "message": "too many open connections (the cap is 3); retry later",
            "type": "service_unavailable",
            "param": None,
            "code": 503,
        }
    }
    assert (guard.open, guard.refused) == (CAP, 1)
    await until(lambda: guard.refusing == 0, timeout=5, what="the refusal to end")
    held[0][1].close()
    await until(lambda: guard.open == CAP - 1, timeout=5, what="a place to free up")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    _, reply = await closed_after(reader)
    assert reply.startswith(b"HTTP/1.1 200 OK\r\n") and reply.endswith(b"live")
    for _, w in held[1:]:
        w.close()


async def test_past_the_refusal_bound_a_connection_is_reset(serve: Serve, monkeypatch: pytest.MonkeyPatch) -> None:
    guard, port = await serve(30)
    monkeypatch.setattr(connections, "MAX_REFUSING", 0)
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(CAP)]
    await until(lambda: guard.open == CAP, timeout=5, what="three open connections")
    reader, _ = await asyncio.open_connection("127.0.0.1", port)
    with contextlib.suppress(ConnectionResetError):  # a reset before the read: the same refusal
        assert await asyncio.wait_for(reader.read(), 5) == b""
    assert guard.refused == 0  # not answered: there are already too many refusals in progress
    for _, w in held:
        w.close()


async def test_a_head_sent_too_slowly_is_cut(serve: Serve) -> None:
    _, port = await serve(0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /live HTTP/1.1\r\n")
    seconds, data = await closed_after(reader)
    assert data == b"" and 0.25 < seconds < 2


async def test_a_late_body_is_a_408_and_a_prompt_one_is_echoed(serve: Serve) -> None:
    _, port = await serve(0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n12345")
    seconds, reply = await closed_after(reader)
    assert reply.startswith(b"HTTP/1.1 408 Request Timeout\r\n") and 0.25 < seconds < 2
    assert b'"message": "the request body did not arrive within 0.3s"' in reply
    # The same request whose body comes in time, on a kept-alive connection, twice.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for _ in range(2):
        writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n1234567890")
        reply = await asyncio.wait_for(reader.readuntil(b"1234567890"), 5)
        assert reply.startswith(b"HTTP/1.1 200 OK\r\n")
        await asyncio.sleep(0.4)  # idle longer than the header timeout: no bytes, no head due
    writer.close()


async def test_the_heap_is_released_once_many_connections_have_gone(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    guard, port = await serve(30)
    released: list[int] = []
    monkeypatch.setattr(connections, "TRIM_AFTER_CLOSED", 2)
    monkeypatch.setattr(connections, "TRIM_DELAY_S", 0.01)
    monkeypatch.setattr(connections, "release_heap", lambda: released.append(guard.open))
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(CAP)]
    await until(lambda: guard.open == CAP, timeout=5, what="three open connections")
    held[0][1].close()
    await until(lambda: guard.open == CAP - 1, timeout=5, what="one to close")
    await asyncio.sleep(0.05)
    assert released == []  # one closed of a peak of three: not worth a trim
    held[1][1].close()
    await until(lambda: released == [1], timeout=5, what="a heap release after two of three closed")
    held[2][1].close()


def test_the_descriptor_limit_is_raised_for_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    limits = {"now": (1024, 4096)}
    monkeypatch.setattr(resource, "getrlimit", lambda _: limits["now"])
    monkeypatch.setattr(resource, "setrlimit", lambda _, value: limits.update(now=value))
    reserve = connections.FD_RESERVE
    assert fit_to_fd_limit(1000) == 1000 and limits["now"] == (1000 + reserve, 4096)
    assert fit_to_fd_limit(8192) == 4096 - reserve and limits["now"] == (4096, 4096)  # the hard limit caps it
    limits["now"] = (1024, resource.RLIM_INFINITY)
    assert fit_to_fd_limit(8192) == 8192 and limits["now"] == (8192 + reserve, resource.RLIM_INFINITY)
    limits["now"] = (100_000, 100_000)
    assert fit_to_fd_limit(8192) == 8192 and limits["now"] == (100_000, 100_000)  # enough already
