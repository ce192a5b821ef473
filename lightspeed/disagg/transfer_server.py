"""Prefill side of the KV data channel: pins registered transfers and serves pulls of them.

The event loop accepts connections and reads the one request frame of each pull; the
payload is written by a thread from a bounded pool (blocking `sendmsg` with a timeout), so a
long transfer never blocks the loop the engine steps on. At most `max_concurrent` pulls stream
at once; more wait up to `io_timeout_s` for a slot, then are told "busy".
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from lightspeed.disagg import transfer_shm, transfer_stream
from lightspeed.disagg.transfer_blocks import KvSource, check_positions
from lightspeed.disagg.transfer_registry import Pinned, ReleaseCallback, TransferRegistry
from lightspeed.disagg.transfer_wire import (
    CONTROL_LEN_BYTES,
    PROTOCOL_VERSION,
    KvTransferError,
    PullAck,
    PullReply,
    PullRequest,
    TransferParams,
    block_nbytes,
    control_length,
    decode_control,
    encode_control,
    with_blocks,
)

logger = logging.getLogger(__name__)

DEFAULT_FRAME_BYTES = 4 * 1024 * 1024
MAX_FRAME_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class TransferServerConfig:
    """Limits and addresses of a `KvTransferServer`."""

    host: str = "127.0.0.1"  # bind address; internal planes stay on loopback unless configured
    port: int = 0  # 0 = an ephemeral port
    advertise_host: str = ""  # the address put in TransferParams ("" = `host`)
    pin_timeout_s: float = 30.0  # a transfer nobody pulled is released after this long
    io_timeout_s: float = 10.0  # per socket operation, and the wait for a free slot
    max_concurrent: int = 4  # pulls streaming at once (sender threads)
    max_connections: int = 64  # open connections, streaming or waiting; more are refused
    max_pinned: int = 4096  # transfers registered and not yet released
    frame_bytes: int = DEFAULT_FRAME_BYTES  # payload bytes per data frame
    shm: bool = True  # offer the shared-memory path to pullers on this host
    shm_pool_bytes: int = 1024**3  # idle shared-memory segments kept for reuse

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("host is empty")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port {self.port} is out of 0..65535")
        if self.host in ("0.0.0.0", "::") and not self.advertise_host:
            raise ValueError("advertise_host is required when host is a wildcard address")
        for name in ("pin_timeout_s", "io_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.shm_pool_bytes < 0:
            raise ValueError(f"shm_pool_bytes must be >= 0, got {self.shm_pool_bytes}")
        for name in ("max_concurrent", "max_connections", "max_pinned"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.frame_bytes <= MAX_FRAME_BYTES:
            raise ValueError(f"frame_bytes must be in 1..{MAX_FRAME_BYTES}, got {self.frame_bytes}")


class KvTransferServer:
    """Serves pulls of registered KV transfers. Use `async with` or `start()` / `close()`.

    `register(source)` pins a transfer and returns the `TransferParams` the decode side pulls
    with; the owner's `on_release` callback runs (on the event loop) exactly once, when a pull
    was verified, the transfer timed out, was cancelled, or the server closed.
    """

    def __init__(self, config: TransferServerConfig | None = None) -> None:
        self.config = config or TransferServerConfig()
        self._registry = TransferRegistry(self.config.pin_timeout_s, self.config.max_pinned)
        self._pool = ThreadPoolExecutor(self.config.max_concurrent, thread_name_prefix="kv-send")
        self._slots = asyncio.Semaphore(self.config.max_concurrent)
        self._segments = transfer_shm.SegmentPool(self.config.shm_pool_bytes)
        self._listener: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._conns: dict[socket.socket, asyncio.Task[None]] = {}

    async def __aenter__(self) -> KvTransferServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def address(self) -> tuple[str, int]:
        """(advertised host, bound port); only after `start()`."""
        if self._listener is None:
            raise RuntimeError("KvTransferServer is not started")
        port = int(self._listener.getsockname()[1])
        return (self.config.advertise_host or self.config.host, port)

    @property
    def pinned(self) -> int:
        """Transfers registered and not yet released."""
        return len(self._registry)

    async def start(self) -> None:
        listener = socket.create_server((self.config.host, self.config.port), backlog=self.config.max_connections)
        listener.setblocking(False)
        self._listener = listener
        self._accept_task = asyncio.create_task(self._accept_loop(listener), name="kv-transfer-accept")
        logger.info("KV transfer server on %s:%d", *self.address)

    def register(
        self,
        source: KvSource,
        *,
        on_release: ReleaseCallback | None = None,
        block_hashes: Sequence[int] = (),
        transfer_id: str | None = None,
    ) -> TransferParams:
        """Pin `source` until pulled (or timed out); the params tell the decode side how to pull it.

        `transfer_id` defaults to a fresh unguessable token; a caller-chosen one must be unguessable
        too (it is the only credential a pull presents) and not pinned already.
        """
        header = source.header
        if block_hashes and len(block_hashes) != header.num_blocks:
            raise ValueError(f"block_hashes has {len(block_hashes)} hashes for {header.num_blocks} blocks")
        host, port = self.address
        transfer_id = self._registry.add(source, on_release, transfer_id)
        return TransferParams(
            host=host,
            port=port,
            transfer_id=transfer_id,
            num_blocks=header.num_blocks,
            nbytes=header.num_blocks * block_nbytes(header),
            header=header,
            block_hashes=list(block_hashes),
            host_id=transfer_shm.host_identity() if self.config.shm else "",
        )

    def cancel(self, transfer_id: str) -> bool:
        """Give up a transfer: released as soon as no pull reads it. False if not pinned."""
        return self._registry.cancel(transfer_id)

    async def close(self) -> None:
        """Stop accepting, abort pulls in flight, release every pinned transfer ("shutdown")."""
        if self._accept_task is not None:
            self._accept_task.cancel()
            await asyncio.gather(self._accept_task, return_exceptions=True)
            self._accept_task = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for task in list(self._conns.values()):
            task.cancel()  # a streaming one first stops its sender thread (see _serve)
        await asyncio.gather(*self._conns.values(), return_exceptions=True)
        self._registry.release_all()
        self._pool.shutdown(wait=True)
        self._segments.close()

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(listener)
            conn.setblocking(False)
            if len(self._conns) >= self.config.max_connections:
                self._refuse(conn)
                continue
            task = asyncio.create_task(self._handle(conn), name="kv-transfer-conn")
            self._conns[conn] = task
            task.add_done_callback(functools.partial(self._forget, conn))

    def _forget(self, conn: socket.socket, _task: asyncio.Task[None]) -> None:
        self._conns.pop(conn, None)

    def _refuse(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            conn.send(encode_control(PullReply(ok=False, code="busy", message="too many connections")))
        conn.close()

    async def _handle(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.config.io_timeout_s):  # no extra task, unlike wait_for
                request = await self._read_request(conn)
            entry, refusal = self._admit(request)
            if entry is None:
                await loop.sock_sendall(conn, encode_control(refusal))
                return
            await self._serve(conn, entry, request)
        except (KvTransferError, OSError, TimeoutError) as exc:
            logger.info("KV transfer connection dropped: %s", exc)
        except Exception:
            logger.exception("KV transfer connection failed")
        finally:
            conn.close()

    async def _read_request(self, conn: socket.socket) -> PullRequest:
        prefix = await self._recv_exact(conn, CONTROL_LEN_BYTES)
        body = await self._recv_exact(conn, control_length(prefix))
        return decode_control(body, PullRequest)

    @staticmethod
    async def _recv_exact(conn: socket.socket, size: int) -> bytes:
        loop = asyncio.get_running_loop()
        buf = bytearray(size)
        view = memoryview(buf)
        got = 0
        while got < size:
            n = await loop.sock_recv_into(conn, view[got:])
            if n == 0:
                raise ConnectionError(f"peer closed after {got} of {size} request bytes")
            got += n
        return bytes(buf)

    def _admit(self, request: PullRequest) -> tuple[Pinned | None, PullReply]:
        """The leased transfer, or None and the refusal to send."""
        if request.version != PROTOCOL_VERSION:
            return None, PullReply(ok=False, code="bad_request", message=f"protocol version {request.version}")
        entry = self._registry.lease(request.transfer_id)
        if entry is None:
            return None, PullReply(ok=False, code="not_found", message="no such KV transfer pinned")
        try:
            if request.positions is not None:
                check_positions(request.positions, entry.source.header.num_blocks)
        except ValueError as exc:
            self._registry.end_lease(entry, pulled=False)
            return None, PullReply(ok=False, code="bad_request", message=str(exc))
        return entry, PullReply(ok=True)

    async def _serve(self, conn: socket.socket, entry: Pinned, request: PullRequest) -> None:
        loop = asyncio.get_running_loop()
        pulled = False
        try:
            try:
                async with asyncio.timeout(self.config.io_timeout_s):
                    await self._slots.acquire()
            except TimeoutError:
                await loop.sock_sendall(conn, encode_control(PullReply(ok=False, code="busy", message="no slot")))
                return
            try:
                transfer_stream.set_io_timeout(conn, self.config.io_timeout_s)  # blocking, for the thread
                pulled = await self._in_thread(conn, entry, request)
            finally:
                self._slots.release()
        finally:
            self._registry.end_lease(entry, pulled)

    async def _in_thread(self, conn: socket.socket, entry: Pinned, request: PullRequest) -> bool:
        """`_stream` on a sender thread. Cancelled, it waits for the thread (after shutting the
        socket down, which fails its blocking call at once): the blocks must stay pinned while
        the thread may still read them."""
        future = asyncio.get_running_loop().run_in_executor(self._pool, self._stream, conn, entry, request)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(Exception):
                await future
            raise

    def _stream(self, conn: socket.socket, entry: Pinned, request: PullRequest) -> bool:
        """Thread: reply, payload (TCP frames or one shm segment), then the puller's ack."""
        source = entry.source
        positions = request.positions if request.positions is not None else range(source.header.num_blocks)
        header = with_blocks(source.header, len(positions))
        nbytes = header.num_blocks * block_nbytes(header)
        views = source.views(positions)
        use_shm = self.config.shm and bool(request.host_id) and request.host_id == transfer_shm.host_identity()
        if not use_shm:
            reply = PullReply(ok=True, header=header, nbytes=nbytes, frame_bytes=self.config.frame_bytes)
            conn.sendall(encode_control(reply))
            transfer_stream.send_frames(conn, views, self.config.frame_bytes)
            return transfer_stream.recv_control(conn, PullAck).ok
        segment = self._segments.take(nbytes)
        acked = False
        try:
            checksum = transfer_shm.fill(segment, views, nbytes)
            reply = PullReply(ok=True, header=header, nbytes=nbytes, shm_name=segment.name, shm_checksum=checksum)
            conn.sendall(encode_control(reply))
            acked = transfer_stream.recv_control(conn, PullAck).ok
            return acked
        finally:
            # Without an ok ack the puller may still be reading it: never refill that segment.
            self._segments.give_back(segment, reusable=acked)
