"""Decode side of the KV data channel: pulls a transfer's blocks into a destination.

One pull = one request frame, then either TCP data frames received with `recv_into` into one
preallocated buffer (which is then the import source) or, when both ends share a host and agree,
one shared-memory segment imported in place. Every byte is length- and checksum-verified before
the destination sees it; short or corrupted payloads are retried up to `retries` times and never
imported. Socket work runs on a bounded thread pool, so the event loop keeps stepping the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import xxhash

from lightspeed.disagg import transfer_shm, transfer_stream
from lightspeed.disagg.transfer_blocks import KvDestination, check_positions
from lightspeed.disagg.transfer_wire import (
    PROTOCOL_VERSION,
    KvTransferError,
    LayoutMismatch,
    ProtocolError,
    PullAck,
    PullReply,
    PullRequest,
    PullResult,
    TransferCorrupt,
    TransferMode,
    TransferNotFound,
    TransferParams,
    TransferUnavailable,
    block_nbytes,
    encode_control,
    with_blocks,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TransferClientConfig:
    """Limits of a `KvTransferClient`."""

    retries: int = 3  # further attempts after a retryable failure (short, corrupt, unreachable)
    retry_backoff_s: float = 0.05  # sleep before attempt n+1: n × this
    io_timeout_s: float = 10.0  # per socket operation (connect, each receive)
    max_concurrent: int = 4  # pulls in flight at once (receiver threads)
    max_payload_bytes: int = 8 * 1024**3  # refuse larger transfers instead of allocating them
    max_frame_bytes: int = 64 * 1024 * 1024  # a data frame announcing more is corrupt
    shm: bool = True  # accept the shared-memory path when the prefill side is on this host
    staging_pool_bytes: int = 1024**3  # idle receive buffers kept for the next pull

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")
        if self.retry_backoff_s < 0:
            raise ValueError(f"retry_backoff_s must be >= 0, got {self.retry_backoff_s}")
        if not self.io_timeout_s > 0:
            raise ValueError(f"io_timeout_s must be > 0, got {self.io_timeout_s}")
        if self.staging_pool_bytes < 0:
            raise ValueError(f"staging_pool_bytes must be >= 0, got {self.staging_pool_bytes}")
        for name in ("max_concurrent", "max_payload_bytes", "max_frame_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


class _ShmUnusable(TransferUnavailable):
    """The segment the server named cannot be opened here: fall back to TCP."""


class _Aborted(KvTransferError):
    """The caller cancelled the pull."""


class _Abort:
    """How a cancelled pull stops its thread: a flag checked before importing, and a socket
    shut down so a blocked receive returns at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tripped = False
        self._sock: socket.socket | None = None

    def attach(self, sock: socket.socket) -> None:
        with self._lock:
            self._sock = sock
        self.check()

    def check(self) -> None:
        if self._tripped:
            raise _Aborted("pull cancelled")

    def trip(self) -> None:
        with self._lock:
            self._tripped = True
            if self._sock is not None:
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_RDWR)


@dataclass(frozen=True)
class _Plan:
    params: TransferParams
    positions: list[int] | None  # None = every block, in order
    nbytes: int
    expected: PullReply  # the header and size a correct reply announces


class KvTransferClient:
    """Pulls KV transfers. One per decode worker; `close()` (or `async with`) frees its threads."""

    def __init__(self, config: TransferClientConfig | None = None) -> None:
        self.config = config or TransferClientConfig()
        self._pool = ThreadPoolExecutor(self.config.max_concurrent, thread_name_prefix="kv-recv")
        self._slots = asyncio.Semaphore(self.config.max_concurrent)
        self._staging = StagingPool(self.config.staging_pool_bytes)

    async def __aenter__(self) -> KvTransferClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    async def pull(
        self, params: TransferParams, dest: KvDestination, positions: Sequence[int] | None = None
    ) -> PullResult:
        """Pull the blocks at `positions` (indices into the transfer, default all) into `dest`.

        `dest` receives them in `positions` order. Raises LayoutMismatch (incompatible cache),
        TransferNotFound (released or timed out), ValueError (bad params or positions), or the
        last retryable error (TransferCorrupt, TransferUnavailable) once retries are spent.
        """
        plan = self._plan(params, dest, positions)
        started = time.perf_counter()
        use_shm = self.config.shm and bool(params.host_id) and params.host_id == transfer_shm.host_identity()
        async with self._slots:
            buffer: bytearray | None = None
            try:
                for attempt in range(1, self.config.retries + 2):
                    if buffer is None and not use_shm:
                        buffer = self._staging.take(plan.nbytes)  # one buffer for every retry
                    try:
                        mode = await self._run_attempt(plan, dest, buffer, use_shm)
                    except KvTransferError as exc:
                        if not exc.retryable or attempt > self.config.retries:
                            raise
                        use_shm = use_shm and not isinstance(exc, _ShmUnusable)
                        logger.warning("KV pull %s attempt %d failed (%s); retrying", params.transfer_id, attempt, exc)
                        await asyncio.sleep(self.config.retry_backoff_s * attempt)
                        continue
                    seconds = time.perf_counter() - started
                    num_blocks = plan.expected.header.num_blocks if plan.expected.header else 0
                    return PullResult(params.transfer_id, mode, num_blocks, plan.nbytes, attempt, seconds)
            finally:
                if buffer is not None:
                    self._staging.give_back(buffer)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _run_attempt(
        self, plan: _Plan, dest: KvDestination, buffer: bytearray | None, use_shm: bool
    ) -> TransferMode:
        """One attempt on a worker thread. A cancelled caller aborts it and waits for the thread:
        it must not import into blocks, or write a buffer, that the caller has given up."""
        abort = _Abort()
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._pool, self._attempt, plan, dest, buffer, use_shm, abort)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            abort.trip()
            with contextlib.suppress(Exception):
                await future  # prompt: its socket is shut down, and it no longer imports
            raise

    def _plan(self, params: TransferParams, dest: KvDestination, positions: Sequence[int] | None) -> _Plan:
        params.validate()
        wanted = None if positions is None else list(positions)
        if wanted is not None:
            check_positions(wanted, params.num_blocks)
        count = params.num_blocks if wanted is None else len(wanted)
        header = with_blocks(params.header, count)
        accepted = dest.expected_header(count)
        if header != accepted:
            raise LayoutMismatch(f"incompatible KV blocks: sender has {header}, cache expects {accepted}")
        nbytes = count * block_nbytes(header)
        if nbytes > self.config.max_payload_bytes:
            raise ValueError(f"transfer of {nbytes} bytes exceeds max_payload_bytes {self.config.max_payload_bytes}")
        return _Plan(params, wanted, nbytes, PullReply(ok=True, header=header, nbytes=nbytes))

    def _attempt(
        self, plan: _Plan, dest: KvDestination, buffer: bytearray | None, use_shm: bool, abort: _Abort
    ) -> TransferMode:
        """Thread: one connection, one request, the payload, the ack, the import."""
        params = plan.params
        host_id = transfer_shm.host_identity() if use_shm else ""
        request = PullRequest(PROTOCOL_VERSION, params.transfer_id, plan.positions, host_id)
        try:
            with socket.create_connection((params.host, params.port), timeout=self.config.io_timeout_s) as sock:
                transfer_stream.set_io_timeout(sock, self.config.io_timeout_s)
                abort.attach(sock)
                sock.sendall(encode_control(request))
                reply = transfer_stream.recv_control(sock, PullReply)
                self._check_reply(reply, plan)
                if reply.shm_name:
                    if not use_shm:
                        raise ProtocolError("server chose shared memory that was not offered")
                    self._land_shm(sock, reply, plan, dest, abort)
                    return "shm"
                assert buffer is not None
                self._land_tcp(sock, reply, buffer, dest, abort)
                return "tcp"
        except (OSError, TimeoutError) as exc:
            raise TransferUnavailable(f"{params.host}:{params.port}: {exc}") from exc

    def _check_reply(self, reply: PullReply, plan: _Plan) -> None:
        if not reply.ok:
            if reply.code == "not_found":
                raise TransferNotFound(f"transfer {plan.params.transfer_id}: {reply.message}")
            if reply.code == "busy":
                raise TransferUnavailable(f"server busy: {reply.message}")
            raise ProtocolError(f"server refused the pull ({reply.code}): {reply.message}")
        if reply.header != plan.expected.header:
            raise LayoutMismatch(f"incompatible KV blocks: sender has {reply.header}, expected {plan.expected.header}")
        if reply.nbytes != plan.nbytes:
            raise ProtocolError(f"reply announces {reply.nbytes} bytes, expected {plan.nbytes}")
        if not reply.shm_name and not 0 < reply.frame_bytes <= self.config.max_frame_bytes:
            raise ProtocolError(f"frame_bytes {reply.frame_bytes} outside 1..{self.config.max_frame_bytes}")

    def _land_tcp(
        self, sock: socket.socket, reply: PullReply, buffer: bytearray, dest: KvDestination, abort: _Abort
    ) -> None:
        view = memoryview(buffer)[: reply.nbytes]
        transfer_stream.recv_frames(sock, view, reply.frame_bytes)
        # Verified: the prefill side may free its blocks while we import.
        sock.sendall(encode_control(PullAck(ok=True)))
        abort.check()
        dest.land(view)

    def _land_shm(self, sock: socket.socket, reply: PullReply, plan: _Plan, dest: KvDestination, abort: _Abort) -> None:
        try:
            segment = transfer_shm.Mapping(reply.shm_name, plan.nbytes)
        except OSError as exc:
            sock.sendall(encode_control(PullAck(ok=False)))
            raise _ShmUnusable(f"cannot open shared memory {reply.shm_name!r}: {exc}") from exc
        try:
            if xxhash.xxh3_64_intdigest(segment.buf) != reply.shm_checksum:
                raise TransferCorrupt("checksum mismatch in the shared-memory payload")
            abort.check()
            dest.land(segment.buf)
            sock.sendall(encode_control(PullAck(ok=True)))
        finally:
            # A view still held (e.g. by a failed import's traceback) keeps the mapping until GC.
            with contextlib.suppress(BufferError):
                segment.close()


class StagingPool:
    """Receive buffers kept between pulls (up to `max_idle_bytes`): a fresh buffer's first write
    faults in every page, which costs a large share of a loopback transfer's time."""

    def __init__(self, max_idle_bytes: int) -> None:
        self._max_idle_bytes = max_idle_bytes
        self._idle: list[bytearray] = []  # smallest first

    def take(self, nbytes: int) -> bytearray:
        for i, buf in enumerate(self._idle):
            if len(buf) >= nbytes:
                return self._idle.pop(i)
        return bytearray(nbytes)

    def give_back(self, buf: bytearray) -> None:
        self._idle.append(buf)
        self._idle.sort(key=len)
        while self._idle and sum(len(b) for b in self._idle) > self._max_idle_bytes:
            self._idle.pop()  # the largest goes first
