"""Request plane: framing, streaming, multiplexing, cancellation, failures, drain."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest

from lightspeed.errors import WorkerError, WorkerLost
from lightspeed.runtime.framing import (
    Cancel,
    Data,
    End,
    Error,
    Frame,
    FrameDecoder,
    FrameError,
    Request,
    encode_frame,
)
from lightspeed.runtime.request_plane import (
    RequestContext,
    RequestPlaneClient,
    RequestPlaneServer,
    ServerLimits,
)
from tests.polling import until

# ---------------------------------------------------------------- framing


def test_frame_roundtrip_all_types() -> None:
    frames: list[Frame] = [
        Request(1, "generate", b"\x00\x01"),
        Cancel(1),
        Data(1, b"tok"),
        End(1),
        Error(2, "ValueError", "bad"),
    ]
    wire = b"".join(encode_frame(f) for f in frames)
    assert FrameDecoder().feed(wire) == frames


def test_frame_header_is_big_endian_body_length() -> None:
    buf = encode_frame(End(7))
    assert int.from_bytes(buf[:4], "big") == len(buf) - 4


def test_decoder_reassembles_byte_by_byte() -> None:
    frames: list[Frame] = [Data(3, b"x" * 300), End(3)]
    wire = b"".join(encode_frame(f) for f in frames)
    dec = FrameDecoder()
    got = []
    for i in range(len(wire)):
        got.extend(dec.feed(wire[i : i + 1]))
    assert got == frames
    assert dec.pending_bytes == 0


def test_decoder_keeps_partial_tail() -> None:
    wire = bytes(encode_frame(Data(1, b"a"))) + bytes(encode_frame(Data(2, b"b")))
    dec = FrameDecoder()
    assert dec.feed(wire[:-3]) == [Data(1, b"a")]
    assert dec.pending_bytes == len(wire) // 2 - 3
    assert dec.feed(wire[-3:]) == [Data(2, b"b")]


def test_decoder_rejects_oversized_and_garbage() -> None:
    with pytest.raises(FrameError):
        FrameDecoder(max_frame=10).feed((11).to_bytes(4, "big") + b"\x00" * 11)
    with pytest.raises(FrameError):
        FrameDecoder().feed((1).to_bytes(4, "big") + b"\xc1")


# ---------------------------------------------------------------- handlers


async def count(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
    for i in range(int(payload)):
        yield str(i).encode()


async def tagged(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
    tag, n = payload.decode().split(":")
    for i in range(int(n)):
        await asyncio.sleep(0)  # interleave with the other streams
        yield f"{tag}:{i}".encode()


async def echo_twice(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
    yield payload
    yield payload[::-1]


async def fail_after_one(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
    yield b"first"
    raise ValueError("boom")


class Blocking:
    """Yields one item, then waits forever; records how it ended."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.contexts: list[RequestContext] = []
        self.finished = 0
        self.all_done = asyncio.Event()
        self.expected = 1

    async def __call__(self, payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        self.contexts.append(ctx)
        try:
            yield b"started"
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.log.append(f"cancelled:{payload.decode()}")
            raise
        finally:
            self.log.append(f"finally:{payload.decode()}")
            self.finished += 1
            if self.finished == self.expected:
                self.all_done.set()


async def slow_three(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
    for i in range(3):
        await asyncio.sleep(0.05)  # a slow producer: in flight long enough to be drained
        yield str(i).encode()


@pytest.fixture
async def server() -> AsyncIterator[RequestPlaneServer]:
    srv = RequestPlaneServer()
    srv.register("count", count)
    srv.register("tagged", tagged)
    srv.register("echo", echo_twice)
    srv.register("fail", fail_after_one)
    srv.register("slow", slow_three)
    await srv.start()
    yield srv
    await srv.stop(drain_timeout=0)


@pytest.fixture
async def client() -> AsyncIterator[RequestPlaneClient]:
    cl = RequestPlaneClient()
    yield cl
    await cl.close()


async def collect(stream: AsyncIterator[bytes]) -> list[bytes]:
    return [item async for item in stream]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# ---------------------------------------------------------------- streaming


async def test_start_returns_bound_address(server: RequestPlaneServer) -> None:
    host, port = server.address.split(":")
    assert host == "127.0.0.1"
    assert int(port) > 0


async def test_streams_payloads_in_order(server: RequestPlaneServer, client: RequestPlaneClient) -> None:
    stream = await client.stream(server.address, "count", b"100")
    assert await collect(stream) == [str(i).encode() for i in range(100)]
    assert not stream.open


async def test_empty_stream_ends(server: RequestPlaneServer, client: RequestPlaneClient) -> None:
    assert await collect(await client.stream(server.address, "count", b"0")) == []


async def test_concurrent_streams_share_one_connection(server: RequestPlaneServer, client: RequestPlaneClient) -> None:
    async def one(tag: int) -> list[bytes]:
        return await collect(await client.stream(server.address, "tagged", f"{tag}:20".encode()))

    results = await asyncio.gather(*(one(tag) for tag in range(50)))
    for tag, got in enumerate(results):
        assert got == [f"{tag}:{i}".encode() for i in range(20)]
    assert server.num_connections == 1
    assert server.num_inflight == 0


async def test_large_payload_roundtrip(server: RequestPlaneServer, client: RequestPlaneClient) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB
    got = await collect(await client.stream(server.address, "echo", payload))
    assert got == [payload, payload[::-1]]


# ---------------------------------------------------------------- cancellation


async def test_cancel_reaches_handler_finally(server: RequestPlaneServer, client: RequestPlaneClient) -> None:
    blocking = Blocking()
    server.register("block", blocking)
    stream = await client.stream(server.address, "block", b"a")
    assert await stream.__anext__() == b"started"
    await stream.cancel()
    await asyncio.wait_for(blocking.all_done.wait(), 2.0)
    assert blocking.log == ["cancelled:a", "finally:a"]
    assert blocking.contexts[0].cancelled
    assert await collect(stream) == []
    await until(lambda: server.num_inflight == 0, timeout=2, what="the handler's task to be dropped")


async def test_aclose_of_finished_stream_sends_nothing(server: RequestPlaneServer, client: RequestPlaneClient) -> None:
    async with await client.stream(server.address, "count", b"2") as stream:
        assert await collect(stream) == [b"0", b"1"]
    # The connection is still healthy for the next stream.
    assert await collect(await client.stream(server.address, "count", b"1")) == [b"0"]


async def test_client_close_cancels_server_handlers(server: RequestPlaneServer) -> None:
    blocking = Blocking()
    blocking.expected = 3
    server.register("block", blocking)
    client = RequestPlaneClient()
    streams = [await client.stream(server.address, "block", str(i).encode()) for i in range(3)]
    for stream in streams:
        assert await stream.__anext__() == b"started"
    await client.close()
    await asyncio.wait_for(blocking.all_done.wait(), 2.0)
    assert sorted(blocking.log) == sorted([f"cancelled:{i}" for i in range(3)] + [f"finally:{i}" for i in range(3)])
    assert all(ctx.cancelled for ctx in blocking.contexts)
    for stream in streams:
        with pytest.raises(WorkerLost):
            await stream.__anext__()


async def test_wait_cancelled_wakes_on_cancel(server: RequestPlaneServer, client: RequestPlaneClient) -> None:
    seen = asyncio.Event()

    async def watcher(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        yield b"go"
        try:
            await ctx.wait_cancelled()
        finally:
            seen.set()

    server.register("watch", watcher)
    stream = await client.stream(server.address, "watch", b"")
    assert await stream.__anext__() == b"go"
    await stream.aclose()
    await asyncio.wait_for(seen.wait(), 2.0)


# ---------------------------------------------------------------- errors


async def test_handler_error_becomes_worker_error(server: RequestPlaneServer, client: RequestPlaneClient) -> None:
    stream = await client.stream(server.address, "fail", b"")
    assert await stream.__anext__() == b"first"
    with pytest.raises(WorkerError) as info:
        await stream.__anext__()
    assert info.value.code == "ValueError"
    assert info.value.message == "boom"


async def test_handler_failing_before_iteration_becomes_worker_error(
    server: RequestPlaneServer, client: RequestPlaneClient
) -> None:
    def not_a_generator(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        raise KeyError("missing")

    server.register("sync-fail", not_a_generator)
    with pytest.raises(WorkerError) as info:
        await collect(await client.stream(server.address, "sync-fail", b""))
    assert (info.value.code, info.value.message) == ("KeyError", "'missing'")
    assert server.num_inflight == 0


async def test_unknown_endpoint(server: RequestPlaneServer, client: RequestPlaneClient) -> None:
    stream = await client.stream(server.address, "nope", b"")
    with pytest.raises(WorkerError) as info:
        await stream.__anext__()
    assert info.value.code == "UnknownEndpoint"


async def test_connect_failure_is_worker_lost(client: RequestPlaneClient) -> None:
    with pytest.raises(WorkerLost) as info:
        await client.stream(f"127.0.0.1:{free_port()}", "count", b"1")
    assert info.value.code == "ConnectFailed"


async def test_dialled_connections_fail_a_silent_peer_instead_of_hanging(
    server: RequestPlaneServer, client: RequestPlaneClient
) -> None:
    """Keepalive and TCP_USER_TIMEOUT (PEER_TIMEOUT_S) on the client's socket: the kernel
    aborts a connection whose peer stopped acking (a firewall, a cut link)."""
    assert await collect(await client.stream(server.address, "count", b"1")) == [b"0"]
    sock = client._conns[server.address]._transport.get_extra_info("socket")  # type: ignore[union-attr]
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 10_000
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 5


async def test_bad_address_is_value_error(client: RequestPlaneClient) -> None:
    with pytest.raises(ValueError):
        await client.stream("no-port", "count", b"1")


async def test_server_crash_mid_stream_is_worker_lost(client: RequestPlaneClient) -> None:
    """A peer that sends one Data frame and then drops the socket, like a killed worker."""

    async def crashing_peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        dec = FrameDecoder()
        frames: list[Frame] = []
        while not frames:
            frames = dec.feed(await reader.read(65536))
        writer.write(encode_frame(Data(frames[0].id, b"partial")))
        await writer.drain()
        writer.transport.abort()

    peer = await asyncio.start_server(crashing_peer, "127.0.0.1", 0)
    port = peer.sockets[0].getsockname()[1]
    try:
        stream = await client.stream(f"127.0.0.1:{port}", "generate", b"")
        assert await stream.__anext__() == b"partial"
        with pytest.raises(WorkerLost):
            await stream.__anext__()
    finally:
        peer.close()
        await peer.wait_closed()


async def test_reconnects_after_connection_drop(client: RequestPlaneClient) -> None:
    port = free_port()
    first = RequestPlaneServer(port=port)
    first.register("count", count)
    address = await first.start()
    assert await collect(await client.stream(address, "count", b"1")) == [b"0"]
    await first.stop(drain_timeout=0)

    second = RequestPlaneServer(port=port)
    second.register("count", count)
    await second.start()
    try:
        # The client must have noticed that the old connection closed (else it writes to it).
        await until(lambda: address not in client._conns, timeout=2, what="the drop to be noticed")
        assert await collect(await client.stream(address, "count", b"2")) == [b"0", b"1"]
    finally:
        await second.stop(drain_timeout=0)


# ---------------------------------------------------------------- graceful stop


async def test_stop_drains_inflight_and_rejects_new(server: RequestPlaneServer) -> None:
    client = RequestPlaneClient()
    try:
        stream = await client.stream(server.address, "slow", b"")
        assert await stream.__anext__() == b"0"
        stopping = asyncio.create_task(server.stop(drain_timeout=5.0))
        await asyncio.sleep(0)  # one turn: stop() marks the server draining before its first await
        late = await client.stream(server.address, "count", b"1")
        with pytest.raises(WorkerLost) as info:
            await late.__anext__()
        assert info.value.code == "ShuttingDown"
        assert await collect(stream) == [b"1", b"2"]
        await asyncio.wait_for(stopping, 2.0)
        assert server.num_inflight == 0
        with pytest.raises(WorkerLost):
            await client.stream(server.address, "count", b"1")
    finally:
        await client.close()


async def test_stop_cancels_streams_past_drain_timeout(server: RequestPlaneServer) -> None:
    blocking = Blocking()
    server.register("block", blocking)
    client = RequestPlaneClient()
    try:
        stream = await client.stream(server.address, "block", b"z")
        assert await stream.__anext__() == b"started"
        await asyncio.wait_for(server.stop(drain_timeout=0.05), 2.0)
        assert blocking.log == ["cancelled:z", "finally:z"]
        with pytest.raises(WorkerLost):
            await stream.__anext__()
    finally:
        await client.close()


def test_register_validation() -> None:
    srv = RequestPlaneServer()
    srv.register("a", count)
    with pytest.raises(ValueError):
        srv.register("a", count)
    with pytest.raises(ValueError):
        srv.register("", count)
    with pytest.raises(ValueError):
        RequestPlaneServer(port=70000)


# ---------------------------------------------------------------- hostile peers


async def _limited_server(**limits: float) -> RequestPlaneServer:
    srv = RequestPlaneServer(limits=ServerLimits(**limits))  # type: ignore[arg-type]
    srv.register("count", count)
    await srv.start()
    return srv


async def _raw(address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = address.split(":")
    return await asyncio.open_connection(host, int(port))


async def _closed_by_peer(reader: asyncio.StreamReader) -> bool:
    """EOF, or a reset: a peer that aborts with our bytes still unread sends RST, not FIN."""
    try:
        return await asyncio.wait_for(reader.read(), timeout=5.0) == b""
    except ConnectionResetError:
        return True


async def test_huge_length_prefix_is_refused_before_buffering(client: RequestPlaneClient) -> None:
    srv = await _limited_server()
    try:
        reader, writer = await _raw(srv.address)
        writer.write((200 * 1024 * 1024).to_bytes(4, "big") + b"\x00" * 65536)
        assert await _closed_by_peer(reader)
        assert srv.buffered_bytes == 0
        # Everyone else is still served.
        assert await collect(await client.stream(srv.address, "count", b"3")) == [b"0", b"1", b"2"]
        writer.close()
    finally:
        await srv.stop(drain_timeout=0)


async def test_incomplete_frame_times_out(client: RequestPlaneClient) -> None:
    srv = await _limited_server(partial_frame_timeout=0.3)
    try:
        reader, writer = await _raw(srv.address)
        writer.write((1000).to_bytes(4, "big") + b"\x00" * 10)  # announces 1000, sends 10
        await until(lambda: srv.buffered_bytes == 14, timeout=5, what="partial frame buffered")
        started = asyncio.get_running_loop().time()
        assert await _closed_by_peer(reader)
        assert asyncio.get_running_loop().time() - started < 5.0
        await until(lambda: srv.buffered_bytes == 0 and srv.num_connections == 0, timeout=5, what="release")
        assert await collect(await client.stream(srv.address, "count", b"1")) == [b"0"]
        writer.close()
    finally:
        await srv.stop(drain_timeout=0)


async def test_complete_frames_cancel_the_partial_timer() -> None:
    srv = await _limited_server(partial_frame_timeout=0.3)
    try:
        reader, writer = await _raw(srv.address)
        frame = bytes(encode_frame(Request(1, "count", b"2")))
        writer.write(frame[:3])  # a partial frame, completed well within the timeout
        await until(lambda: srv.buffered_bytes == 3, timeout=5, what="partial frame buffered")
        writer.write(frame[3:])
        body = b""
        while End(1) not in FrameDecoder().feed(body):
            body += await asyncio.wait_for(reader.read(4096), timeout=5)
        assert srv.buffered_bytes == 0
        await asyncio.sleep(0.5)  # past the timeout: the connection must still be open
        assert srv.num_connections == 1
        writer.close()
    finally:
        await srv.stop(drain_timeout=0)


async def test_total_buffered_bytes_are_capped() -> None:
    srv = await _limited_server(max_frame_bytes=4096, max_buffered_bytes=6000)
    try:
        _, first_w = await _raw(srv.address)
        first_w.write((4000).to_bytes(4, "big") + b"\x00" * 3900)
        await until(lambda: srv.buffered_bytes == 3904, timeout=5, what="first partial frame")
        second_r, second_w = await _raw(srv.address)
        second_w.write((4000).to_bytes(4, "big") + b"\x00" * 3900)  # 7808 > 6000: dropped
        assert await _closed_by_peer(second_r)
        await until(lambda: srv.buffered_bytes == 3904, timeout=5, what="second released")
        assert srv.num_connections == 1  # the first peer is untouched
        first_w.close()
        second_w.close()
    finally:
        await srv.stop(drain_timeout=0)


async def test_connection_cap_refuses_extra_peers(client: RequestPlaneClient) -> None:
    srv = await _limited_server(max_connections=2)
    try:
        peers = [await _raw(srv.address) for _ in range(2)]
        await until(lambda: srv.num_connections == 2, timeout=5, what="two peers")
        extra_r, extra_w = await _raw(srv.address)
        assert await _closed_by_peer(extra_r)
        assert srv.num_connections == 2
        for _, w in peers:
            w.close()
        await until(lambda: srv.num_connections == 0, timeout=5, what="peers gone")
        assert await collect(await client.stream(srv.address, "count", b"1")) == [b"0"]
        extra_w.close()
    finally:
        await srv.stop(drain_timeout=0)


def test_server_limits_validation() -> None:
    with pytest.raises(ValueError):
        ServerLimits(max_frame_bytes=10)
    with pytest.raises(ValueError):
        ServerLimits(max_frame_bytes=1 << 20, max_buffered_bytes=1 << 10)
    with pytest.raises(ValueError):
        ServerLimits(partial_frame_timeout=0)
