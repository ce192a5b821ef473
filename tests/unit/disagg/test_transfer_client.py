"""KvTransferClient: short and corrupted payloads are detected and retried (a fault-injecting proxy
between a real server and the client), forged replies are clean errors, the loop keeps running."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import msgspec
import pytest

from lightspeed.disagg.transfer import (
    BufferDestination,
    CacheSource,
    KvTransferClient,
    KvTransferServer,
    ProtocolError,
    TransferClientConfig,
    TransferCorrupt,
    TransferParams,
    TransferRelease,
    TransferServerConfig,
    TransferUnavailable,
)
from lightspeed.disagg.transfer_wire import PullReply, encode_control, with_blocks
from tests.polling import until
from tests.unit.disagg.test_transfer_fixtures import Fault, FaultyProxy, random_cache

FRAME = 3000
NUM_BLOCKS = 12  # 12 blocks x 2520 B = 30240 B: eleven frames


@pytest.fixture
async def server() -> AsyncIterator[KvTransferServer]:
    async with KvTransferServer(TransferServerConfig(frame_bytes=FRAME, shm=False)) as srv:
        yield srv


def _client(retries: int = 3, **kw: object) -> KvTransferClient:
    return KvTransferClient(TransferClientConfig(retries=retries, retry_backoff_s=0.0, shm=False, **kw))  # type: ignore[arg-type]


def _reply_bytes(params: TransferParams) -> int:
    """Length of the reply frame the server sends before the first data frame."""
    reply = PullReply(ok=True, header=with_blocks(params.header, NUM_BLOCKS), nbytes=params.nbytes, frame_bytes=FRAME)
    return len(encode_control(reply))


async def _via_proxy(
    params: TransferParams, faults: list[Fault | None], delay_s: float = 0.0
) -> tuple[TransferParams, FaultyProxy]:
    proxy = FaultyProxy(params.port, faults, delay_s)
    port = await proxy.start()
    return msgspec.structs.replace(params, port=port), proxy


SOURCE = CacheSource(random_cache(32, seed=21), list(range(3, 3 + NUM_BLOCKS)))
PAYLOAD = b"".join(bytes(view) for view in SOURCE.views(range(NUM_BLOCKS)))


def _register(server: KvTransferServer, released: list[TransferRelease] | None = None) -> TransferParams:
    return server.register(SOURCE, on_release=None if released is None else released.append)


@pytest.mark.parametrize(
    ("kind", "where"),
    [
        ("flip", "payload"),  # a flipped byte inside the first frame's body: checksum mismatch
        ("flip", "trailer"),  # a flipped checksum
        ("flip", "length"),  # the top byte of the first frame's length: far over the limit
        ("cut", "payload"),  # the stream ends in the middle of a frame
        ("cut", "reply"),  # the stream ends inside the reply frame
    ],
)
async def test_damaged_stream_is_detected_and_retried(server: KvTransferServer, kind: str, where: str) -> None:
    released: list[TransferRelease] = []
    params = _register(server, released)
    reply = _reply_bytes(params)
    offset = {"payload": reply + 8 + 100, "trailer": reply + 8 + FRAME + 3, "length": reply + 7, "reply": 5}[where]
    via, proxy = await _via_proxy(params, [Fault(kind, offset)])
    dest = BufferDestination(params.header)
    async with _client() as client:
        result = await client.pull(via, dest)
    await proxy.close()
    assert (result.attempts, proxy.connections) == (2, 2)
    assert dest.payload == PAYLOAD
    await until(lambda: bool(released), timeout=5.0, interval=0.01)
    assert released == [TransferRelease(params.transfer_id, "pulled", NUM_BLOCKS)]


async def test_retries_spent_raise_and_nothing_is_imported(server: KvTransferServer) -> None:
    params = _register(server)
    faults: list[Fault | None] = [Fault("flip", _reply_bytes(params) + 500)] * 3
    via, proxy = await _via_proxy(params, faults)
    dest = BufferDestination(params.header)
    async with _client(retries=2) as client:
        with pytest.raises(TransferCorrupt, match="checksum mismatch"):
            await client.pull(via, dest)
    await proxy.close()
    assert (dest.payload, proxy.connections, server.pinned) == (None, 3, 1)


async def test_no_retries_means_one_attempt(server: KvTransferServer) -> None:
    params = _register(server)
    via, proxy = await _via_proxy(params, [Fault("cut", _reply_bytes(params) + 20)])
    async with _client(retries=0) as client:
        with pytest.raises(TransferCorrupt, match="stream ended"):
            await client.pull(via, BufferDestination(params.header))
    await proxy.close()
    assert proxy.connections == 1


async def test_unreachable_server_is_unavailable_after_retries(server: KvTransferServer) -> None:
    params = _register(server)
    proxy = FaultyProxy(params.port, [])
    port = await proxy.start()
    await proxy.close()  # nothing listens on `port` any more
    async with _client(retries=1, io_timeout_s=2.0) as client:
        with pytest.raises(TransferUnavailable, match=f"127.0.0.1:{port}"):
            await client.pull(msgspec.structs.replace(params, port=port), BufferDestination(params.header))


async def test_event_loop_keeps_running_while_a_pull_lands(server: KvTransferServer) -> None:
    params = _register(server)
    via, proxy = await _via_proxy(params, [], delay_s=0.1)  # each chunk the proxy forwards waits 0.1 s
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    async with _client() as client:
        result = await client.pull(via, BufferDestination(params.header))
    task.cancel()
    await proxy.close()
    assert result.seconds >= 0.1
    assert ticks >= 5  # the decode loop kept stepping while the transfer landed


async def test_cancelled_pull_stops_its_thread_and_imports_nothing(server: KvTransferServer) -> None:
    params = _register(server)
    via, proxy = await _via_proxy(params, [], delay_s=0.3)  # the reply reaches the client after 0.3 s
    dest = BufferDestination(params.header)
    async with _client() as client:
        pull = asyncio.create_task(client.pull(via, dest))
        await asyncio.sleep(0.1)
        pull.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pull
        await asyncio.sleep(1.5)  # were the thread still running, it would have landed by now
        assert dest.payload is None
        result = await client.pull(params, dest)  # not acked: still pinned, and the client is whole
    await proxy.close()
    assert (result.attempts, dest.payload) == (1, PAYLOAD)


async def _forged_server(reply: bytes) -> tuple[asyncio.Server, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        writer.write(reply)
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    return srv, int(srv.sockets[0].getsockname()[1])


@pytest.mark.parametrize(
    ("reply", "error", "match"),
    [
        (b"\xff\xff\xff\xff", ProtocolError, "control frame of 4294967295 bytes"),
        (b"\x00\x00\x00\x03abc", ProtocolError, "undecodable PullReply"),
        ("wrong-size", ProtocolError, "reply announces"),
        ("huge-frames", ProtocolError, "frame_bytes"),
        ("refused", ProtocolError, "bad_request"),
    ],
)
async def test_forged_replies_are_clean_errors(
    server: KvTransferServer, reply: bytes | str, error: type[Exception], match: str
) -> None:
    params = _register(server)
    header = with_blocks(params.header, NUM_BLOCKS)
    forged = {
        "wrong-size": PullReply(ok=True, header=header, nbytes=params.nbytes + 1, frame_bytes=FRAME),
        "huge-frames": PullReply(ok=True, header=header, nbytes=params.nbytes, frame_bytes=1 << 40),
        "refused": PullReply(ok=False, code="bad_request", message="no"),
    }
    body = reply if isinstance(reply, bytes) else encode_control(forged[reply])
    srv, port = await _forged_server(body)
    async with _client() as client:
        with pytest.raises(error, match=match):
            await client.pull(msgspec.structs.replace(params, port=port), BufferDestination(params.header))
    srv.close()
    await srv.wait_closed()


async def test_bad_positions_and_oversized_transfers_are_refused_before_connecting(
    server: KvTransferServer,
) -> None:
    params = _register(server)
    dest = BufferDestination(params.header)
    async with _client(max_payload_bytes=params.nbytes - 1) as client:
        with pytest.raises(ValueError, match="duplicates"):
            await client.pull(params, dest, positions=[1, 1])
        with pytest.raises(ValueError, match=r"in \[0, 12\)"):
            await client.pull(params, dest, positions=[12])
        with pytest.raises(ValueError, match="positions is empty"):
            await client.pull(params, dest, positions=[])
        with pytest.raises(ValueError, match="max_payload_bytes"):
            await client.pull(params, dest)
    assert server.pinned == 1


@pytest.mark.parametrize(
    ("field", "value"),
    [("retries", -1), ("retry_backoff_s", -0.1), ("io_timeout_s", 0.0), ("max_concurrent", 0), ("max_frame_bytes", 0)],
)
def test_client_config_is_validated(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        TransferClientConfig(**{field: value})  # type: ignore[arg-type]
