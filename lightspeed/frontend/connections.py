"""HTTP connections the frontend accepts: capped, timed, and their memory given back.

aiohttp on its own waits forever for a request head or a promised body and accepts every
connection until the process runs out of descriptors. Each accepted connection here is wrapped
(`_Guarded`, in front of aiohttp's own protocol) and held to:

- a header timeout: a connection has `header_timeout` seconds from accepting (or from the first
  byte of a later request) to deliver a complete request head, or it is closed (slowloris);
- a body timeout: once the head is in, the body must arrive within `body_timeout` seconds, or
  the request gets a 408 JSON error and the connection is closed (a Content-Length the client
  never sends);
- a keep-alive timeout (aiohttp's own): an idle connection is closed after `keepalive_timeout`;
- a cap: past `max_connections` open connections, a new one is answered at once with
  `HTTP/1.1 503` and an OpenAI error body (`Retry-After: 1`, `Connection: close`) and closed,
  so a client sees a normal, retryable HTTP error instead of a hang or a reset.

When many connections have gone away, the freed heap is handed back to the OS (gc + glibc's
`malloc_trim`): CPython and glibc otherwise keep it, and a burst of idle sockets would leave
the frontend hundreds of MB larger for good.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import gc
import logging
import resource
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import cast

import msgspec
from aiohttp import web

from lightspeed.errors import LightspeedError, Overloaded

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Refused connections linger (to hand the 503 over without a reset) at most this long, and at
# most this many at once; past that a new one is reset outright.
REFUSAL_LINGER_S = 1.0
MAX_REFUSING = 256
# Descriptors kept for everything but client connections (workers, planes, files, refusals).
FD_RESERVE = 512 + MAX_REFUSING
# Give the heap back once this many connections have closed since the peak, half of them at least.
TRIM_AFTER_CLOSED = 256
TRIM_DELAY_S = 1.0
REFUSAL_LOG_INTERVAL_S = 10.0


class BodyTimeout(LightspeedError, TimeoutError):
    """The request body did not arrive in time. A TimeoutError too, so that aiohttp, draining
    the rest of the body after the response, takes it as a timeout and closes the connection."""

    status = 408
    error_type = "invalid_request_error"


@dataclass(frozen=True, slots=True)
class HttpLimits:
    header_timeout: float
    body_timeout: float
    max_connections: int


class ConnectionGuard:
    """The protocol factory of the listening socket: counts, caps and times connections."""

    def __init__(self, limits: HttpLimits) -> None:
        self.limits = limits
        self.open = 0  # accepted and not yet closed
        self.refusing = 0
        self.refused = 0  # since start
        self._peak = 0
        self._trim: asyncio.TimerHandle | None = None
        self._refusal = _refusal_bytes(limits.max_connections)
        self._logged_refusals = 0
        self._last_log = float("-inf")

    def accept(self, make_handler: Callable[[], asyncio.Protocol]) -> asyncio.Protocol:
        """The protocol for a connection just accepted: aiohttp's, guarded, or a refusal."""
        if self.open >= self.limits.max_connections:
            return _Refusal(self)
        return _Guarded(self, make_handler())

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Marks the connection busy (no header timeout) and bounds the body read."""
        conn = _guarded(request)
        if conn is not None:
            conn.request_started()
        deadline = self._body_deadline(request)
        try:
            return await handler(request)
        except BodyTimeout as err:  # an app without its own error middleware: answer it here
            response = web.json_response(err.to_openai(), status=err.status)
            response.force_close()
            return response
        finally:
            if deadline is not None:
                deadline.cancel()
            if conn is not None:
                conn.request_finished()

    def _body_deadline(self, request: web.Request) -> asyncio.TimerHandle | None:
        content = request.content
        if not request.body_exists or content.is_eof():
            return None

        def expire() -> None:
            if not content.is_eof():
                seconds = self.limits.body_timeout
                content.set_exception(BodyTimeout(f"the request body did not arrive within {seconds:g}s"))

        return asyncio.get_running_loop().call_later(self.limits.body_timeout, expire)

    def opened(self) -> None:
        self.open += 1
        self._peak = max(self._peak, self.open)

    def closed(self) -> None:
        self.open -= 1
        if self._peak - self.open >= TRIM_AFTER_CLOSED and self.open <= self._peak // 2 and self._trim is None:
            self._trim = asyncio.get_running_loop().call_later(TRIM_DELAY_S, self._release_heap)

    def _release_heap(self) -> None:
        self._trim = None
        self._peak = self.open
        release_heap()

    def refusal_started(self) -> bytes:
        self.refusing += 1
        self.refused += 1
        now = asyncio.get_running_loop().time()
        if now - self._last_log >= REFUSAL_LOG_INTERVAL_S:
            log.warning(
                "%d open connections (the cap): refused %d new ones with 503",
                self.open,
                self.refused - self._logged_refusals,
            )
            self._last_log, self._logged_refusals = now, self.refused
        return self._refusal


class _Guarded(asyncio.Protocol):
    """aiohttp's protocol for one connection, behind a header timeout."""

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol) -> None:
        self._guard = guard
        self._inner = inner
        self._transport: asyncio.BaseTransport | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._busy = False  # a request is being handled: its head is in

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._guard.opened()
        self._arm_head_timer()
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if not self._busy and self._head_timer is None:
            self._arm_head_timer()  # the first byte of the next request: its head is due
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        self._guard.closed()
        self._inner.connection_lost(exc)

    def request_started(self) -> None:
        self._busy = True
        self._cancel_head_timer()

    def request_finished(self) -> None:
        self._busy = False

    def _arm_head_timer(self) -> None:
        loop = asyncio.get_running_loop()
        self._head_timer = loop.call_later(self._guard.limits.header_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._busy and self._transport is not None and not self._transport.is_closing():
            log.debug("closing a connection: no complete request head in %gs", self._guard.limits.header_timeout)
            self._transport.close()


class _Refusal(asyncio.Protocol):
    """A connection past the cap: answered with the 503, then closed once the client has it."""

    def __init__(self, guard: ConnectionGuard) -> None:
        self._guard = guard
        self._timer: asyncio.TimerHandle | None = None
        self._counted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        stream = cast(asyncio.Transport, transport)  # uvloop's do not subclass asyncio's
        if self._guard.refusing >= MAX_REFUSING:
            stream.abort()
            return
        self._counted = True
        stream.write(self._guard.refusal_started())
        # Half-close and read until the client closes: closing with its request unread would
        # send a reset, and the client could lose the 503 it has not read yet.
        if stream.can_write_eof():
            stream.write_eof()
        self._timer = asyncio.get_running_loop().call_later(REFUSAL_LINGER_S, stream.close)

    def data_received(self, data: bytes) -> None:
        pass  # the request of a refused connection: discarded

    def eof_received(self) -> bool:
        return False  # the client is done: close

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._counted:
            self._guard.refusing -= 1


def _guarded(request: web.Request) -> _Guarded | None:
    transport = request.transport
    protocol = transport.get_protocol() if transport is not None else None
    return protocol if isinstance(protocol, _Guarded) else None


def _refusal_bytes(cap: int) -> bytes:
    error = Overloaded(f"too many open connections (the cap is {cap}); retry later")
    body = msgspec.json.encode(error.to_openai())
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Retry-After: 1\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


class GuardedSite(web.BaseSite):
    """A TCP site whose connections go through a `ConnectionGuard`."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        guard: ConnectionGuard,
        *,
        reuse_port: bool,
        backlog: int,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(runner, backlog=backlog, ssl_context=ssl_context)
        self._host, self._port, self._guard, self._reuse_port = host, port, guard, reuse_port

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context is not None else "http"
        return f"{scheme}://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None  # BaseSite checked that the runner is set up
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: self._guard.accept(server),
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_port=self._reuse_port or None,
            ssl=self._ssl_context,
        )


def fit_to_fd_limit(max_connections: int) -> int:
    """Raise the soft descriptor limit toward what the cap needs; returns the cap it allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = max_connections + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return max_connections
    allowed = max(soft - FD_RESERVE, 1)
    log.warning("descriptor limit %d allows %d connections, not %d: capping there", soft, allowed, max_connections)
    return allowed


def release_heap() -> None:
    """Free unreachable objects and return free heap pages to the OS (glibc only)."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim  # the process's own libc
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None
    return trim
