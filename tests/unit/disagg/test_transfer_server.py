"""KvTransferServer against raw sockets: forged and bad requests, limits, registration, shutdown."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator

import msgspec
import pytest

from lightspeed.disagg.transfer import (
    BufferDestination,
    CacheSource,
    KvTransferClient,
    KvTransferServer,
    TransferClientConfig,
    TransferParams,
    TransferRelease,
    TransferServerConfig,
)
from lightspeed.disagg.transfer_wire import (
    PROTOCOL_VERSION,
    PullReply,
    PullRequest,
    control_length,
    decode_control,
    encode_control,
)
from tests.polling import until
from tests.unit.disagg.test_transfer_fixtures import random_cache

SOURCE = CacheSource(random_cache(16, seed=31), [2, 3, 4, 5])


@pytest.fixture
async def server() -> AsyncIterator[KvTransferServer]:
    async with KvTransferServer(TransferServerConfig(io_timeout_s=2.0)) as srv:
        yield srv


async def _exchange(params: TransferParams, raw: bytes) -> PullReply | None:
    """Send raw bytes as a request; the reply frame, or None when the server just hangs up."""
    reader, writer = await asyncio.open_connection(params.host, params.port)
    try:
        writer.write(raw)
        await writer.drain()
        prefix = await reader.read(4)
        if not prefix:
            return None
        body = await reader.readexactly(control_length(prefix))
        return decode_control(body, PullReply)
    finally:
        writer.close()


def _request(params: TransferParams, positions: list[int] | None = None, version: int = PROTOCOL_VERSION) -> bytes:
    return encode_control(PullRequest(version, params.transfer_id, positions, ""))


async def _pull_ok(server: KvTransferServer, params: TransferParams) -> None:
    async with KvTransferClient(TransferClientConfig(shm=False, retries=0)) as client:
        await client.pull(params, BufferDestination(params.header))
    await until(lambda: server.pinned == 0, timeout=5.0, interval=0.01)


@pytest.mark.parametrize(
    "raw",
    [
        b"\x7f\xff\xff\xff",  # a 2 GiB control frame announced: refused before buffering
        b"\x00\x00\x00\x00",  # an empty one
        b"\x00\x00\x00\x05\xc1\xc1\xc1\xc1\xc1",  # not msgpack
        encode_control(PullReply(ok=True)),  # a well-formed frame of the wrong kind
        b"\x00\x00\x10\x00abc",  # a short body, then the peer stops sending (io timeout)
    ],
)
async def test_forged_requests_drop_the_connection_and_nothing_else(server: KvTransferServer, raw: bytes) -> None:
    params = server.register(SOURCE)
    assert await _exchange(params, raw) is None
    assert server.pinned == 1
    await _pull_ok(server, params)  # the server and the transfer are unharmed


@pytest.mark.parametrize(
    ("positions", "message"),
    [([0, 0], "duplicates"), ([4], r"in \[0, 4\)"), ([-1], r"in \[0, 4\)"), ([], "positions is empty")],
)
async def test_bad_positions_are_refused_and_the_transfer_stays_pinned(
    server: KvTransferServer, positions: list[int], message: str
) -> None:
    params = server.register(SOURCE)
    reply = await _exchange(params, _request(params, positions))
    assert reply is not None
    assert (reply.ok, reply.code) == (False, "bad_request")
    assert re.search(message, reply.message)
    assert server.pinned == 1
    await _pull_ok(server, params)


async def test_wrong_protocol_version_and_unknown_transfer_are_refused(server: KvTransferServer) -> None:
    params = server.register(SOURCE)
    old = await _exchange(params, _request(params, version=PROTOCOL_VERSION + 1))
    assert old is not None
    assert (old.ok, old.code) == (False, "bad_request")
    ghost = msgspec.structs.replace(params, transfer_id="x" * 22)
    missing = await _exchange(ghost, _request(ghost))
    assert missing is not None
    assert (missing.ok, missing.code) == (False, "not_found")
    assert server.pinned == 1


async def test_connections_over_the_limit_are_told_busy() -> None:
    async with KvTransferServer(TransferServerConfig(max_connections=1, io_timeout_s=2.0)) as server:
        params = server.register(SOURCE)
        _idle_r, idle_w = await asyncio.open_connection(params.host, params.port)  # holds the only slot
        await until(lambda: len(server._conns) == 1, timeout=5.0, interval=0.01)
        busy = await _exchange(params, _request(params))
        assert busy is not None
        assert (busy.ok, busy.code) == (False, "busy")
        idle_w.close()


async def test_register_checks_ids_hashes_and_the_pin_limit() -> None:
    async with KvTransferServer(TransferServerConfig(max_pinned=2)) as server:
        chosen = server.register(SOURCE, transfer_id="abc123", block_hashes=[11, 12, 13, 14])
        assert (chosen.transfer_id, chosen.block_hashes, chosen.num_blocks) == ("abc123", [11, 12, 13, 14], 4)
        with pytest.raises(ValueError, match="already pinned"):
            server.register(SOURCE, transfer_id="abc123")
        with pytest.raises(ValueError, match="transfer_id must have"):
            server.register(SOURCE, transfer_id="")
        with pytest.raises(ValueError, match="block_hashes has 2 hashes for 4 blocks"):
            server.register(SOURCE, block_hashes=[1, 2])
        server.register(SOURCE)
        with pytest.raises(RuntimeError, match="max_pinned"):
            server.register(SOURCE)
        assert server.pinned == 2


async def test_params_carry_the_advertised_address_and_host_identity() -> None:
    config = TransferServerConfig(host="127.0.0.1", advertise_host="localhost", shm=False)
    async with KvTransferServer(config) as server:
        params = server.register(SOURCE)
        assert (params.host, params.port, params.host_id) == ("localhost", server.address[1], "")
        assert params.nbytes == 4 * 3 * 2 * 5 * 3 * 7 * 4
        params.validate()


async def test_close_aborts_a_stalled_pull_and_releases_it() -> None:
    released: list[TransferRelease] = []
    server = KvTransferServer(TransferServerConfig(frame_bytes=1000, io_timeout_s=30.0))
    await server.start()
    big = CacheSource(random_cache(256, seed=32), list(range(256)))  # 645 KB: fills the socket buffers
    params = server.register(big, on_release=released.append)
    reader, writer = await asyncio.open_connection(params.host, params.port)
    writer.write(_request(params))
    await reader.readexactly(100)  # the pull is streaming; this reader now stalls
    await asyncio.wait_for(server.close(), timeout=10.0)
    assert released == [TransferRelease(params.transfer_id, "shutdown", 256)]
    writer.close()


async def test_close_does_not_wait_out_a_pull_queued_for_a_slot() -> None:
    released: list[TransferRelease] = []
    server = KvTransferServer(TransferServerConfig(max_concurrent=1, frame_bytes=1000, io_timeout_s=30.0))
    await server.start()
    big = CacheSource(random_cache(256, seed=33), list(range(256)))
    params = server.register(big, on_release=released.append)
    stalled_r, stalled_w = await asyncio.open_connection(params.host, params.port)
    stalled_w.write(_request(params))
    await stalled_r.readexactly(100)  # streaming in the only slot; this reader now stalls
    queued_r, queued_w = await asyncio.open_connection(params.host, params.port)
    queued_w.write(_request(params))  # waits for the slot
    await asyncio.sleep(0.1)
    started = time.monotonic()
    await asyncio.wait_for(server.close(), timeout=10.0)
    assert time.monotonic() - started < 5.0
    assert released == [TransferRelease(params.transfer_id, "shutdown", 256)]
    assert await queued_r.read() == b""  # dropped without a reply
    stalled_w.close(), queued_w.close()


def test_register_before_start_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="not started"):
        KvTransferServer().register(SOURCE)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"port": 70000}, "port"),
        ({"host": "0.0.0.0"}, "advertise_host"),
        ({"pin_timeout_s": 0}, "pin_timeout_s"),
        ({"io_timeout_s": -1}, "io_timeout_s"),
        ({"max_concurrent": 0}, "max_concurrent"),
        ({"max_pinned": 0}, "max_pinned"),
        ({"frame_bytes": 0}, "frame_bytes"),
        ({"frame_bytes": 65 * 1024 * 1024}, "frame_bytes"),
    ],
)
def test_server_config_is_validated(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        TransferServerConfig(**kwargs)  # type: ignore[arg-type]
