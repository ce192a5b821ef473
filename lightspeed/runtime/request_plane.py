"""Request plane: streamed request/response over TCP between frontends and workers.

One TCP connection per (client, worker address) carries many concurrent streams, multiplexed by
stream id (see framing.py). The client sends `Request`/`Cancel`; the server answers each stream
with `Data`* then `End` or `Error`. A server handler is an async generator; a `Cancel` frame or
the connection closing cancels its task, so the generator's `finally` runs (that is how an engine
frees a request's KV blocks when the client goes away).

Both sides are plain `asyncio.Protocol`s rather than streams: frames are decoded straight out of
`data_received` and delivered to per-stream deques without a task per frame, and outgoing frames
are coalesced into one `transport.write` per event-loop iteration, because syscalls and task
switches dominate the per-token cost at tens of thousands of frames per second.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import cast

from lightspeed.errors import WorkerError, WorkerLost
from lightspeed.runtime.cluster_auth import ClusterKey, new_nonce, proofs_match
from lightspeed.runtime.framing import (
    HANDSHAKE_FRAME_BYTES,
    MAX_FRAME_BYTES,
    Auth,
    AuthOk,
    Cancel,
    Challenge,
    Data,
    End,
    Error,
    Frame,
    FrameDecoder,
    FrameError,
    Request,
    encode_frame,
)

log = logging.getLogger(__name__)

# Error codes with a meaning on both sides of the wire.
CODE_UNKNOWN_ENDPOINT = "UnknownEndpoint"
CODE_SHUTTING_DOWN = "ShuttingDown"  # the request never started: safe to send elsewhere
CODE_CONNECT_FAILED = "ConnectFailed"  # the worker could not be dialled: nothing was sent
CODE_PROTOCOL = "ProtocolError"

# Past this many buffered outgoing bytes, write now instead of at the end of the loop iteration,
# so a handler that yields without awaiting still meets transport flow control.
_FLUSH_BYTES = 256 * 1024
# A worker that stops answering at the TCP level (a firewall dropping its packets, a cut link,
# a dead host) must fail the streams on its connection, not hang them: the kernel aborts the
# connection when sent bytes stay unacknowledged this long, and probes an idle one (keepalive)
# so a silent peer is noticed too. A live worker's kernel acks at once, however slow its engine.
PEER_TIMEOUT_S = 10
_KEEPALIVE_IDLE_S = 5
_KEEPALIVE_PROBES = 5  # one a second after the idle time


@dataclass(frozen=True)
class ServerLimits:
    """What one peer may make a server hold. A peer past a limit loses its connection (its
    streams are cancelled like any other disconnect); other peers are untouched."""

    max_frame_bytes: int = MAX_FRAME_BYTES
    # A frame must arrive whole within this many seconds of its first byte, so a peer cannot
    # pin a buffer (and a connection) by trickling a frame or by announcing more than it sends.
    partial_frame_timeout: float = 10.0
    # Bytes of incomplete frames buffered across all connections of the server.
    max_buffered_bytes: int = 64 * 1024 * 1024
    max_connections: int = 4096
    # With a cluster secret: seconds a new connection has to prove it before it is dropped.
    handshake_timeout: float = 5.0

    def __post_init__(self) -> None:
        if self.max_frame_bytes < 64 or self.max_buffered_bytes < self.max_frame_bytes:
            raise ValueError("max_frame_bytes must be >= 64 and <= max_buffered_bytes")
        if self.partial_frame_timeout <= 0 or self.max_connections < 1 or self.handshake_timeout <= 0:
            raise ValueError("partial_frame_timeout and handshake_timeout must be > 0, max_connections >= 1")


class _FrameProtocol(asyncio.Protocol):
    """Shared connection plumbing: frame decoding, write coalescing, write flow control."""

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self._loop = asyncio.get_running_loop()
        self._decoder = FrameDecoder(max_frame_bytes)
        self._transport: asyncio.Transport | None = None
        self._out: list[bytes | bytearray] = []
        self._out_bytes = 0
        self._flush_scheduled = False
        self._paused = False
        self._resume: asyncio.Future[None] | None = None
        self.closed = False
        self.lost: asyncio.Future[None] = self._loop.create_future()

    # ---------------------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not an isinstance check: uvloop's transports do not subclass asyncio.Transport.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            frames = self._decoder.feed(data)
        except FrameError as exc:
            log.warning("dropping connection: %s", exc)
            self.abort()
            return
        for frame in frames:
            self._on_frame(frame)
        self._on_buffered(self._decoder.pending_bytes)

    def _on_buffered(self, pending: int) -> None:
        """Hook: `pending` bytes of an incomplete frame are held after this read."""

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._out.clear()
        self._wake_writers()
        if not self.lost.done():
            self.lost.set_result(None)
        self._on_lost(exc)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake_writers()

    # ---------------------------------------------------------------- for subclasses

    def _on_frame(self, frame: Frame) -> None:
        raise NotImplementedError

    def _on_lost(self, exc: Exception | None) -> None:
        raise NotImplementedError

    def send(self, frame: Frame) -> None:
        """Queue a frame; it is written with the others queued in this loop iteration."""
        if self.closed:
            return
        buf = encode_frame(frame)
        self._out.append(buf)
        self._out_bytes += len(buf)
        if self._out_bytes >= _FLUSH_BYTES:
            self._flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    async def writable(self) -> None:
        """Wait while the transport's write buffer is over its high-water mark."""
        while self._paused and not self.closed:
            if self._resume is None:
                self._resume = self._loop.create_future()
            await self._resume

    def close(self) -> None:
        """Write what is queued, then close (the transport flushes its own buffer first)."""
        if self._transport is not None and not self.closed:
            self._flush()
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self.closed or not self._out or self._transport is None:
            return
        out = self._out
        self._out = []
        self._out_bytes = 0
        if len(out) == 1:
            self._transport.write(out[0])
        else:
            self._transport.writelines(out)

    def _wake_writers(self) -> None:
        if self._resume is not None and not self._resume.done():
            self._resume.set_result(None)
        self._resume = None


# ==================================================================== server


class RequestContext:
    """Per-stream state a handler can consult: whether the client cancelled or went away."""

    __slots__ = ("_cancelled", "_event", "stream_id")

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id
        self._cancelled = False
        self._event: asyncio.Event | None = None

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    async def wait_cancelled(self) -> None:
        if self._cancelled:
            return
        if self._event is None:
            self._event = asyncio.Event()
        await self._event.wait()

    def _cancel(self) -> None:
        self._cancelled = True
        if self._event is not None:
            self._event.set()


Handler = Callable[[bytes, RequestContext], AsyncIterator[bytes]]


class _ServerConnection(_FrameProtocol):
    def __init__(self, server: RequestPlaneServer) -> None:
        super().__init__(server.limits.max_frame_bytes)
        self._server = server
        self._streams: dict[int, tuple[asyncio.Task[None], RequestContext]] = {}
        self._pending = 0  # bytes of an incomplete frame, counted in the server's total
        self._partial_timer: asyncio.TimerHandle | None = None
        # With a cluster secret, nothing but the handshake is accepted until the peer proves it.
        self._nonce: bytes | None = None
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._refused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if len(self._server._conns) >= self._server.limits.max_connections:
            log.warning("refusing request-plane connection: %d open", len(self._server._conns))
            self._refuse()
            return
        self._server._conns.add(self)
        if self._server.key is not None:
            self._nonce = new_nonce()
            self._decoder.set_max_frame(HANDSHAKE_FRAME_BYTES)
            timeout = self._server.limits.handshake_timeout
            self._handshake_timer = self._loop.call_later(timeout, self._handshake_expired)
            self.send(Challenge(self._nonce))

    def _peer(self) -> str:
        peer = self._transport.get_extra_info("peername") if self._transport is not None else None
        return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "?"

    def _refuse(self) -> None:
        self._refused = True
        self.abort()

    def _handshake_expired(self) -> None:
        log.warning("dropping request-plane peer %s: no cluster-secret proof within the timeout", self._peer())
        self._refuse()

    def _authenticate(self, frame: Frame) -> None:
        key, nonce = self._server.key, self._nonce
        assert key is not None and nonce is not None
        ok = type(frame) is Auth and proofs_match(key.caller_proof(nonce, frame.nonce), frame.proof)
        if not ok:
            log.warning("dropping request-plane peer %s: it does not hold the cluster secret", self._peer())
            self._refuse()
            return
        assert type(frame) is Auth
        self._nonce = None
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        self._decoder.set_max_frame(self._server.limits.max_frame_bytes)
        self.send(AuthOk(key.worker_proof(nonce, frame.nonce)))

    def _on_buffered(self, pending: int) -> None:
        self._server._buffered += pending - self._pending
        self._pending = pending
        if self._server._buffered > self._server.limits.max_buffered_bytes:
            log.warning("dropping connection: request plane holds %d partial-frame bytes", self._server._buffered)
            self.abort()
        elif pending and self._partial_timer is None:
            timeout = self._server.limits.partial_frame_timeout
            self._partial_timer = self._loop.call_later(timeout, self._partial_expired)
        elif not pending and self._partial_timer is not None:
            self._partial_timer.cancel()
            self._partial_timer = None

    def _partial_expired(self) -> None:
        log.warning(
            "dropping connection: a frame stayed incomplete for %.0fs", self._server.limits.partial_frame_timeout
        )
        self.abort()

    def _on_frame(self, frame: Frame) -> None:
        if self._refused:
            return  # frames decoded from the same read as the one that got the peer dropped
        if self._nonce is not None:
            self._authenticate(frame)
        elif type(frame) is Request:
            self._start(frame)
        elif type(frame) is Cancel:
            self._cancel(frame.id)
        else:
            log.warning("ignoring unexpected %s frame from client", type(frame).__name__)

    def _on_lost(self, exc: Exception | None) -> None:
        self._server._conns.discard(self)
        self._server._buffered -= self._pending
        self._pending = 0
        for timer in (self._partial_timer, self._handshake_timer):
            if timer is not None:
                timer.cancel()
        self.cancel_all()

    def cancel_all(self) -> None:
        for stream_id in list(self._streams):
            self._cancel(stream_id)

    def _start(self, req: Request) -> None:
        handler = self._server._handlers.get(req.endpoint)
        if self._server._draining:
            self.send(Error(req.id, CODE_SHUTTING_DOWN, "server is shutting down"))
        elif handler is None:
            self.send(Error(req.id, CODE_UNKNOWN_ENDPOINT, f"no endpoint {req.endpoint!r}"))
        elif req.id in self._streams:
            self.send(Error(req.id, CODE_PROTOCOL, f"stream id {req.id} already open"))
        else:
            ctx = RequestContext(req.id)
            task = self._loop.create_task(self._run(handler, req, ctx))
            self._streams[req.id] = (task, ctx)
            self._server._track(task)

    def _cancel(self, stream_id: int) -> None:
        entry = self._streams.get(stream_id)
        if entry is not None:
            task, ctx = entry
            ctx._cancel()
            task.cancel()

    async def _run(self, handler: Handler, req: Request, ctx: RequestContext) -> None:
        gen: AsyncIterator[bytes] | None = None
        try:
            gen = handler(req.payload, ctx)
            async for payload in gen:
                if self._paused:
                    await self.writable()
                self.send(Data(req.id, payload))
            self.send(End(req.id))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the handler's failure belongs to this stream only
            log.warning("handler for %r failed: %r", req.endpoint, exc, exc_info=log.isEnabledFor(logging.DEBUG))
            self.send(Error(req.id, type(exc).__name__, str(exc)))
        finally:
            self._streams.pop(req.id, None)
            await _close_generator(gen)


async def _close_generator(gen: AsyncIterator[bytes] | None) -> None:
    """Cancelled between items, a generator is parked at a `yield`: close it so its `finally`
    runs now rather than whenever it is garbage collected."""
    aclose = getattr(gen, "aclose", None)
    if aclose is None:
        return
    try:
        await aclose()
    except Exception:  # its cleanup failing must not mask how the stream ended
        log.exception("handler cleanup failed")


class RequestPlaneServer:
    """Serves named endpoints; each request is streamed back by its handler."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        limits: ServerLimits | None = None,
        key: ClusterKey | None = None,
    ) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be in 0..65535; got {port}")
        self._host = host
        self._port = port
        self.limits = limits if limits is not None else ServerLimits()
        self.key = key  # None: open plane (anyone who can reach the port may call)
        self._buffered = 0  # partial-frame bytes held across connections
        self._handlers: dict[str, Handler] = {}
        self._server: asyncio.Server | None = None
        self._conns: set[_ServerConnection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._draining = False
        self._address = ""

    def register(self, endpoint: str, handler: Handler) -> None:
        if not endpoint:
            raise ValueError("endpoint name must not be empty")
        if endpoint in self._handlers:
            raise ValueError(f"endpoint {endpoint!r} is already registered")
        self._handlers[endpoint] = handler

    async def start(self) -> str:
        """Listen; returns the bound "host:port" (the real port when port=0)."""
        if self._server is not None:
            raise RuntimeError("server already started")
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _ServerConnection(self), self._host, self._port)
        port = self._server.sockets[0].getsockname()[1]
        self._address = f"{self._host}:{port}"
        log.info("request plane listening on %s", self._address)
        return self._address

    @property
    def address(self) -> str:
        return self._address

    @property
    def num_inflight(self) -> int:
        return len(self._tasks)

    @property
    def num_connections(self) -> int:
        return len(self._conns)

    @property
    def buffered_bytes(self) -> int:
        return self._buffered

    def _track(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self, drain_timeout: float = 5.0) -> None:
        """Stop accepting, let in-flight streams finish up to `drain_timeout`, cancel the rest.

        Cancelled streams end with their connection closing, so clients see `WorkerLost` and
        may migrate the request; new requests during the drain get `ShuttingDown`.
        """
        self._draining = True
        if self._server is not None:
            self._server.close()
        pending: set[asyncio.Task[None]] = set()
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=max(drain_timeout, 0.0))
        if pending:
            log.warning("cancelling %d streams still running after drain", len(pending))
            for conn in list(self._conns):
                conn.cancel_all()  # marks each stream's context cancelled, then its task
            for task in pending:
                task.cancel()  # also those already past their handler, still cleaning up
            await asyncio.gather(*pending, return_exceptions=True)
        conns = list(self._conns)
        for conn in conns:
            conn.close()
        if conns:
            await asyncio.wait([c.lost for c in conns], timeout=1.0)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None


# ==================================================================== client


class ResponseStream:
    """The payloads of one streamed response, in order.

    Ends on `End`; raises `WorkerError` on an `Error` frame and `WorkerLost` when the connection
    drops first. `aclose()`/`cancel()` tell the server to stop if the stream is still open.
    """

    __slots__ = ("_conn", "_error", "_finished", "_items", "_waiter", "stream_id")

    def __init__(self, conn: _ClientConnection, stream_id: int) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self._items: collections.deque[bytes] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._finished = False
        self._error: Exception | None = None

    @property
    def open(self) -> bool:
        """True until End, Error, connection loss or cancel."""
        return not self._finished and self._error is None

    def __aiter__(self) -> ResponseStream:
        return self

    async def __anext__(self) -> bytes:
        while True:
            if self._items:
                return self._items.popleft()
            if self._error is not None:
                raise self._error
            if self._finished:
                raise StopAsyncIteration
            self._waiter = self._conn._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def cancel(self) -> None:
        """Stop the stream: the server cancels its handler; iteration ends."""
        if self.open:
            self._conn._forget(self.stream_id)
            self._conn.send(Cancel(self.stream_id))
        self._finished = True
        self._items.clear()
        self._wake()

    async def aclose(self) -> None:
        await self.cancel()

    async def __aenter__(self) -> ResponseStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # ---------------------------------------------------------------- called by the connection

    def _push(self, payload: bytes) -> None:
        self._items.append(payload)
        self._wake()

    def _finish(self) -> None:
        self._finished = True
        self._wake()

    def _fail(self, error: Exception) -> None:
        if self.open:
            self._error = error
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


def _error_from_frame(frame: Error) -> Exception:
    if frame.code == CODE_SHUTTING_DOWN:
        return WorkerLost(frame.message, code=frame.code)
    return WorkerError(frame.message, code=frame.code)


class _ClientConnection(_FrameProtocol):
    def __init__(
        self, address: str, on_lost: Callable[[_ClientConnection], None], key: ClusterKey | None = None
    ) -> None:
        super().__init__()
        self.address = address
        self._on_lost_cb = on_lost
        self._streams: dict[int, ResponseStream] = {}
        self._next_id = 0
        self._key = key
        self._nonce = new_nonce() if key is not None else b""
        # Set once the worker proved the cluster secret (at once when this side has none).
        self._server_nonce = b""
        self.ready: asyncio.Future[None] = self._loop.create_future()
        # A handshake failure nobody awaits any more (the dial timed out) is not an error to report.
        self.ready.add_done_callback(lambda f: f.cancelled() or f.exception())
        if key is None:
            self.ready.set_result(None)

    def _handshake(self, frame: Frame) -> None:
        """Answer the worker's challenge, then check its proof."""
        if self._key is None:
            if type(frame) is Challenge:
                log.error("worker %s requires the cluster secret and this process has none", self.address)
            return
        if type(frame) is Challenge and len(frame.nonce) == len(self._nonce) and not self._server_nonce:
            self._server_nonce = frame.nonce
            self.send(Auth(self._key.caller_proof(frame.nonce, self._nonce), self._nonce))
            return
        expected = self._key.worker_proof(self._server_nonce, self._nonce) if self._server_nonce else b""
        if type(frame) is AuthOk and expected and proofs_match(expected, frame.proof):
            self.ready.set_result(None)
            return
        log.error("worker %s failed the cluster-secret handshake: dropping it", self.address)
        self.ready.set_exception(WorkerLost(f"worker {self.address} failed the cluster-secret handshake"))
        self.abort()

    def open_stream(self, endpoint: str, payload: bytes) -> ResponseStream:
        if self.closed:
            raise WorkerLost(f"connection to {self.address} is closed")
        self._next_id += 1
        stream = ResponseStream(self, self._next_id)
        self._streams[self._next_id] = stream
        self.send(Request(self._next_id, endpoint, payload))
        return stream

    def _forget(self, stream_id: int) -> None:
        self._streams.pop(stream_id, None)

    def _on_frame(self, frame: Frame) -> None:
        if not self.ready.done() or type(frame) in (Challenge, AuthOk):
            self._handshake(frame)
        # Frames for streams we no longer track (cancelled) are dropped silently.
        elif type(frame) is Data:
            stream = self._streams.get(frame.id)
            if stream is not None:
                stream._push(frame.payload)
        elif type(frame) is End:
            stream = self._streams.pop(frame.id, None)
            if stream is not None:
                stream._finish()
        elif type(frame) is Error:
            stream = self._streams.pop(frame.id, None)
            if stream is not None:
                stream._fail(_error_from_frame(frame))
        else:
            log.warning("ignoring unexpected %s frame from server", type(frame).__name__)

    def _on_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(WorkerLost(f"connection to {self.address} lost during the handshake"))
        self.fail_all(f"connection to {self.address} lost" + (f": {exc}" if exc else ""))
        self._on_lost_cb(self)

    def fail_all(self, message: str) -> None:
        streams = list(self._streams.values())
        self._streams.clear()
        for stream in streams:
            stream._fail(WorkerLost(message))


def _set_peer_timeouts(sock: socket.socket | None) -> None:
    """Keepalive and (Linux) TCP_USER_TIMEOUT on a dialled connection; see PEER_TIMEOUT_S."""
    if sock is None:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    options = (
        ("TCP_KEEPIDLE", _KEEPALIVE_IDLE_S),
        ("TCP_KEEPINTVL", 1),
        ("TCP_KEEPCNT", _KEEPALIVE_PROBES),
        ("TCP_USER_TIMEOUT", PEER_TIMEOUT_S * 1000),
    )
    for name, value in options:
        if hasattr(socket, name):  # not every platform has each
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"request-plane address must be 'host:port'; got {address!r}")
    return host.strip("[]"), int(port)


class RequestPlaneClient:
    """Opens streams to workers; keeps one lazily-dialled connection per worker address."""

    def __init__(self, connect_timeout: float = 5.0, key: ClusterKey | None = None) -> None:
        if connect_timeout <= 0:
            raise ValueError(f"connect_timeout must be > 0; got {connect_timeout}")
        self._connect_timeout = connect_timeout
        self._key = key
        self._conns: dict[str, _ClientConnection] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def stream(self, address: str, endpoint: str, payload: bytes) -> ResponseStream:
        """Send a request; raises `WorkerLost` if the worker cannot be reached."""
        conn = self._conns.get(address)
        if conn is None or conn.closed:
            conn = await self._connect(address)
        return conn.open_stream(endpoint, payload)

    async def _connect(self, address: str) -> _ClientConnection:
        # One dial per address even when many requests start at once.
        lock = self._locks.setdefault(address, asyncio.Lock())
        async with lock:
            conn = self._conns.get(address)
            if conn is not None and not conn.closed:
                return conn
            conn = await self._dial(address)
            self._conns[address] = conn
            return conn

    async def _dial(self, address: str) -> _ClientConnection:
        """Connect and, with a cluster secret, complete the handshake, all within the timeout.
        Nothing has been sent on failure, so the caller may try another worker."""
        host, port = _split_address(address)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._connect_timeout
        try:
            transport, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _ClientConnection(address, self._dropped, self._key), host, port),
                self._connect_timeout,
            )
        except (TimeoutError, OSError) as exc:
            raise WorkerLost(f"cannot connect to {address}: {exc!r}", code=CODE_CONNECT_FAILED) from exc
        _set_peer_timeouts(transport.get_extra_info("socket"))
        try:
            await asyncio.wait_for(asyncio.shield(conn.ready), max(deadline - loop.time(), 0.001))
        except (TimeoutError, WorkerLost) as exc:
            conn.abort()
            why = (
                "no cluster-secret handshake (does it run without the secret?)"
                if isinstance(exc, TimeoutError)
                else exc
            )
            raise WorkerLost(f"cannot connect to {address}: {why}", code=CODE_CONNECT_FAILED) from exc
        return conn

    def _dropped(self, conn: _ClientConnection) -> None:
        if self._conns.get(conn.address) is conn:
            del self._conns[conn.address]

    async def close(self) -> None:
        """Close every connection; open streams fail with `WorkerLost`."""
        conns = list(self._conns.values())
        self._conns.clear()
        for conn in conns:
            conn.fail_all("client closed")
            conn.close()
        if conns:
            await asyncio.wait([c.lost for c in conns], timeout=1.0)
