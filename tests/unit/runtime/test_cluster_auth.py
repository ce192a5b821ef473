"""The cluster secret on the request plane: mutual challenge-response, and every way to fail it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest

from lightspeed.errors import WorkerLost
from lightspeed.runtime.cluster_auth import ClusterKey, check_secret, generate_secret, new_nonce
from lightspeed.runtime.framing import Auth, AuthOk, Challenge, FrameDecoder, Request, encode_frame
from lightspeed.runtime.request_plane import (
    CODE_CONNECT_FAILED,
    RequestContext,
    RequestPlaneClient,
    RequestPlaneServer,
    ServerLimits,
)
from tests.polling import until

SECRET = "s3cret-of-this-cluster"
KEY = ClusterKey.from_secret(SECRET)


async def echo(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
    yield payload
    yield payload[::-1]


async def start(key: ClusterKey | None, limits: ServerLimits | None = None) -> RequestPlaneServer:
    server = RequestPlaneServer(limits=limits, key=key)
    server.register("echo", echo)
    await server.start()
    return server


async def collect(client: RequestPlaneClient, address: str) -> list[bytes]:
    stream = await client.stream(address, "echo", b"abc")
    return [item async for item in stream]


def test_secret_rules() -> None:
    assert len(generate_secret()) == 64
    assert generate_secret() != generate_secret()
    check_secret("")  # empty: planes open
    with pytest.raises(ValueError, match=">= 16 characters"):
        check_secret("short")
    with pytest.raises(ValueError, match="derives no key"):
        ClusterKey.from_secret("")
    other = ClusterKey.from_secret("another-secret-of-16+")
    assert KEY.handshake != other.handshake and KEY.handshake != KEY.cards  # one key per use
    sig = KEY.sign(b"card")
    assert KEY.verify(b"card", sig) and not KEY.verify(b"card2", sig) and not other.verify(b"card", sig)


async def test_same_secret_both_sides_serves() -> None:
    server = await start(KEY)
    client = RequestPlaneClient(key=ClusterKey.from_secret(SECRET))
    try:
        assert await collect(client, server.address) == [b"abc", b"cba"]
        assert await collect(client, server.address) == [b"abc", b"cba"]  # same connection again
    finally:
        await client.close()
        await server.stop()


@pytest.mark.parametrize("client_key", [None, ClusterKey.from_secret("the-wrong-secret-xx")])
async def test_a_caller_without_the_secret_is_dropped_before_any_request(
    client_key: ClusterKey | None, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[bytes] = []

    async def spy(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        calls.append(payload)
        yield payload

    server = RequestPlaneServer(key=KEY)
    server.register("echo", spy)
    await server.start()
    client = RequestPlaneClient(key=client_key, connect_timeout=2.0)
    try:
        with caplog.at_level(logging.WARNING), pytest.raises(WorkerLost):
            await collect(client, server.address)
        assert calls == []
        assert "does not hold the cluster secret" in caplog.text
        await until(lambda: server.num_connections == 0)
    finally:
        await client.close()
        await server.stop()


async def test_a_worker_without_the_secret_is_refused_by_the_caller() -> None:
    server = await start(None)
    client = RequestPlaneClient(key=KEY, connect_timeout=0.3)
    try:
        with pytest.raises(WorkerLost, match="no cluster-secret handshake") as err:
            await collect(client, server.address)
        assert err.value.code == CODE_CONNECT_FAILED  # nothing was sent: safe to try another worker
    finally:
        await client.close()
        await server.stop()


async def test_an_impostor_worker_gets_no_request() -> None:
    """A worker with another secret cannot prove ours: the caller drops it before sending."""
    server = await start(ClusterKey.from_secret("impostor-secret-xxxx"))
    client = RequestPlaneClient(key=KEY, connect_timeout=2.0)
    try:
        with pytest.raises(WorkerLost) as err:
            await collect(client, server.address)
        assert err.value.code == CODE_CONNECT_FAILED
    finally:
        await client.close()
        await server.stop()


async def _raw(address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Challenge]:
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    frames = FrameDecoder().feed(await reader.read(4096))
    assert len(frames) == 1 and isinstance(frames[0], Challenge)
    return reader, writer, frames[0]


async def _is_dropped(reader: asyncio.StreamReader) -> bool:
    return await asyncio.wait_for(reader.read(4096), 3.0) == b""


async def test_raw_peers_requests_garbage_huge_prefix_and_silence_are_dropped() -> None:
    server = await start(KEY, ServerLimits(handshake_timeout=0.3))
    try:
        for wire in (
            encode_frame(Request(1, "echo", b"x")),  # a request before proving anything
            b"\x00\x00\x00\x10" + b"\xff" * 16,  # garbage body
            b"\xff\xff\xff\xff",  # a 4 GB length prefix
            b"\x00\x01\x00\x00",  # 64 KiB: far over the handshake's frame limit
        ):
            reader, writer, _ = await _raw(server.address)
            writer.write(wire)
            assert await _is_dropped(reader)
            writer.close()
        reader, writer, _ = await _raw(server.address)  # silent: dropped at the timeout
        assert await _is_dropped(reader)
        writer.close()
        await until(lambda: server.num_connections == 0 and server.buffered_bytes == 0)
    finally:
        await server.stop()


async def test_a_recorded_answer_does_not_open_another_connection() -> None:
    server = await start(KEY)
    try:
        reader, writer, challenge = await _raw(server.address)
        nonce = new_nonce()
        answer = encode_frame(Auth(KEY.caller_proof(challenge.nonce, nonce), nonce))
        writer.write(answer)
        ok = FrameDecoder().feed(await reader.read(4096))
        assert ok == [AuthOk(KEY.worker_proof(challenge.nonce, nonce))]
        reader2, writer2, _ = await _raw(server.address)  # a new nonce: the old answer is stale
        writer2.write(answer)
        assert await _is_dropped(reader2)
        for w in (writer, writer2):
            w.close()
    finally:
        await server.stop()
