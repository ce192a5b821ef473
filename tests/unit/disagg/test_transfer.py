"""KV transfer channel end to end: a real server and client on loopback, TCP and shared memory."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import msgspec
import pytest
import torch

from lightspeed.disagg.transfer import (
    BufferDestination,
    CacheDestination,
    CacheSource,
    KvTransferClient,
    KvTransferServer,
    LayoutMismatch,
    TransferClientConfig,
    TransferNotFound,
    TransferParams,
    TransferRelease,
    TransferServerConfig,
    block_nbytes,
)
from lightspeed.disagg.transfer_wire import PROTOCOL_VERSION, PullRequest, encode_control
from lightspeed.native.kv_transfer import export_blocks
from tests.polling import until
from tests.unit.disagg.test_transfer_fixtures import block_bytes, random_cache, zero_cache_like


@pytest.fixture
async def server() -> AsyncIterator[KvTransferServer]:
    # Small frames: every payload here spans several frames and frames split block views.
    async with KvTransferServer(TransferServerConfig(frame_bytes=4000)) as srv:
        yield srv


@pytest.fixture
async def client() -> AsyncIterator[KvTransferClient]:
    async with KvTransferClient(TransferClientConfig(shm=False)) as cli:
        yield cli


def _scattered(num_blocks: int, capacity: int, seed: int) -> list[int]:
    return random.Random(seed).sample(range(capacity), num_blocks)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_blocks", [1, 16, 256])
async def test_round_trip_is_byte_identical(
    server: KvTransferServer, client: KvTransferClient, dtype: torch.dtype, num_blocks: int
) -> None:
    src = random_cache(300, dtype=dtype, seed=num_blocks)
    dst = zero_cache_like(src)
    src_ids = _scattered(num_blocks, 300, seed=1)
    dst_ids = _scattered(num_blocks, 300, seed=2)
    released: list[TransferRelease] = []
    params = server.register(CacheSource(src, src_ids), on_release=released.append)
    result = await client.pull(TransferParams.from_builtins(params.to_builtins()), CacheDestination(dst, dst_ids))
    assert block_bytes(dst, dst_ids) == block_bytes(src, src_ids)
    assert (result.mode, result.num_blocks, result.attempts) == ("tcp", num_blocks, 1)
    assert result.nbytes == params.nbytes == num_blocks * 3 * 2 * 5 * 3 * 7 * dtype.itemsize
    await until(lambda: released == [TransferRelease(params.transfer_id, "pulled", num_blocks)])
    assert server.pinned == 0


async def test_payload_is_the_exporter_layout(server: KvTransferServer, client: KvTransferClient) -> None:
    src = random_cache(40, layers=2, block_size=3, kv_heads=1, head_dim=5, dtype=torch.bfloat16)
    ids = [7, 8, 9, 30, 2]  # a run (7, 8, 9) coalesced into one view, then singles
    params = server.register(CacheSource(src, ids))
    dest = BufferDestination(params.header)
    await client.pull(params, dest)
    exported = export_blocks(src, ids)
    assert dest.payload == exported[len(exported) - params.nbytes :]


@pytest.mark.parametrize("positions", [[0], [3, 1], [0, 2, 4, 5, 6, 15], list(range(15, -1, -1))])
async def test_subset_pull_lands_only_the_requested_blocks(
    server: KvTransferServer, client: KvTransferClient, positions: list[int]
) -> None:
    src = random_cache(64, dtype=torch.bfloat16, seed=3)
    dst = zero_cache_like(src)
    src_ids = _scattered(16, 64, seed=4)
    dst_ids = _scattered(len(positions), 64, seed=5)
    params = server.register(CacheSource(src, src_ids))
    result = await client.pull(params, CacheDestination(dst, dst_ids), positions=positions)
    assert block_bytes(dst, dst_ids) == block_bytes(src, [src_ids[p] for p in positions])
    untouched = sorted(set(range(64)) - set(dst_ids))
    assert all(not torch.any(layer[:, untouched]) for layer in dst.kv_caches)
    assert result.nbytes == len(positions) * params.nbytes // 16


async def test_shm_and_tcp_paths_give_the_same_bytes() -> None:
    src = random_cache(128, dtype=torch.bfloat16, seed=6)
    ids = _scattered(100, 128, seed=7)
    payloads: dict[str, bytes | None] = {}
    async with KvTransferServer(TransferServerConfig(frame_bytes=10_000)) as server:
        for shm in (False, True):
            async with KvTransferClient(TransferClientConfig(shm=shm)) as client:
                params = server.register(CacheSource(src, ids))
                dest = BufferDestination(params.header)
                result = await client.pull(params, dest, positions=list(range(0, 100, 3)))
                payloads[result.mode] = dest.payload
        await until(lambda: server.pinned == 0)
    assert set(payloads) == {"tcp", "shm"}
    assert payloads["tcp"] is not None
    assert payloads["shm"] == payloads["tcp"]


async def test_shm_refused_by_the_server_falls_back_to_tcp() -> None:
    src = random_cache(8, seed=8)
    async with (
        KvTransferServer(TransferServerConfig(shm=False)) as server,
        KvTransferClient(TransferClientConfig(shm=True)) as client,
    ):
        params = server.register(CacheSource(src, [1, 2]))
        dst = zero_cache_like(src)
        result = await client.pull(params, CacheDestination(dst, [5, 6]))
    assert (params.host_id, result.mode) == ("", "tcp")
    assert block_bytes(dst, [5, 6]) == block_bytes(src, [1, 2])


async def test_timeout_releases_the_pinned_blocks_via_the_callback() -> None:
    src = random_cache(8)
    released: list[TransferRelease] = []
    async with (
        KvTransferServer(TransferServerConfig(pin_timeout_s=0.2)) as server,
        KvTransferClient(TransferClientConfig(shm=False)) as client,
    ):
        params = server.register(CacheSource(src, [0, 1, 2]), on_release=released.append)
        assert server.pinned == 1
        await until(lambda: bool(released), timeout=5.0, interval=0.01)
        assert released == [TransferRelease(params.transfer_id, "timeout", 3)]
        assert server.pinned == 0
        with pytest.raises(TransferNotFound):
            await client.pull(params, BufferDestination(params.header))


async def test_puller_that_dies_mid_transfer_leaves_the_blocks_to_the_timeout() -> None:
    src = random_cache(64, seed=9)
    released: list[TransferRelease] = []
    async with KvTransferServer(TransferServerConfig(pin_timeout_s=0.5, frame_bytes=1000)) as server:
        params = server.register(CacheSource(src, list(range(64))), on_release=released.append)
        reader, writer = await asyncio.open_connection(params.host, params.port)
        writer.write(encode_control(PullRequest(PROTOCOL_VERSION, params.transfer_id, None, "")))
        await reader.readexactly(2000)  # the reply and the first frame, then the puller "dies"
        writer.close()
        await asyncio.sleep(0.1)
        assert (released, server.pinned) == ([], 1)  # an unverified pull releases nothing
        await until(lambda: bool(released), timeout=5.0, interval=0.01)
        assert released == [TransferRelease(params.transfer_id, "timeout", 64)]


async def test_cancel_and_close_release_exactly_once() -> None:
    src = random_cache(8)
    released: list[TransferRelease] = []
    server = KvTransferServer()
    await server.start()
    first = server.register(CacheSource(src, [0]), on_release=released.append)
    second = server.register(CacheSource(src, [1, 2]), on_release=released.append)
    assert server.cancel(first.transfer_id) is True
    assert server.cancel(first.transfer_id) is False
    await server.close()
    assert released == [
        TransferRelease(first.transfer_id, "cancelled", 1),
        TransferRelease(second.transfer_id, "shutdown", 2),
    ]


async def test_incompatible_layout_is_refused_before_any_byte_moves(
    server: KvTransferServer, client: KvTransferClient
) -> None:
    src = random_cache(8, head_dim=7)
    params = server.register(CacheSource(src, [0, 1]))
    other = random_cache(8, head_dim=8)
    with pytest.raises(LayoutMismatch, match="head_dim=8"):
        await client.pull(params, CacheDestination(other, [0, 1]))
    as_bf16 = random_cache(8, dtype=torch.bfloat16)
    with pytest.raises(LayoutMismatch, match="bfloat16"):
        await client.pull(params, CacheDestination(as_bf16, [0, 1]))
    with pytest.raises(LayoutMismatch, match="2 blocks offered for 3"):
        await client.pull(params, CacheDestination(zero_cache_like(src), [0, 1, 2]))
    assert server.pinned == 1  # still pullable by a compatible decode worker


async def test_forged_params_are_caught_by_the_reply_header_check(
    server: KvTransferServer, client: KvTransferClient
) -> None:
    src = random_cache(8, head_dim=7)
    params = server.register(CacheSource(src, [0, 1]))
    # Params that claim the decode side's layout (consistent in themselves) for a head_dim 7 transfer.
    dst = random_cache(8, head_dim=14)
    claimed = CacheSource(dst, [0, 1]).header
    forged = msgspec.structs.replace(params, header=claimed, nbytes=2 * block_nbytes(claimed))
    forged.validate()
    dst = zero_cache_like(dst)
    with pytest.raises(LayoutMismatch, match="sender has"):
        await client.pull(forged, CacheDestination(dst, [0, 1]))
    assert all(not torch.any(layer) for layer in dst.kv_caches)


async def test_many_concurrent_pulls_all_land_intact() -> None:
    src = random_cache(512, dtype=torch.bfloat16, seed=10)
    dst = zero_cache_like(src)
    order = _scattered(512, 512, seed=11)
    released: list[TransferRelease] = []
    config = TransferServerConfig(max_concurrent=2, frame_bytes=8192)
    async with KvTransferServer(config) as server, KvTransferClient(TransferClientConfig(shm=False)) as client:
        pulls = []
        for i in range(32):
            src_ids, dst_ids = order[i * 16 : (i + 1) * 16], list(range(i * 16, (i + 1) * 16))
            params = server.register(CacheSource(src, src_ids), on_release=released.append)
            pulls.append(client.pull(params, CacheDestination(dst, dst_ids)))
        results = await asyncio.gather(*pulls)
        await until(lambda: len(released) == 32)
    assert [r.num_blocks for r in results] == [16] * 32
    assert block_bytes(dst, list(range(512))) == block_bytes(src, order)
    assert {r.reason for r in released} == {"pulled"}


async def test_unknown_transfer_is_not_found(server: KvTransferServer, client: KvTransferClient) -> None:
    params = server.register(CacheSource(random_cache(4), [0]))
    ghost = TransferParams.from_builtins({**params.to_builtins(), "transfer_id": "no-such-transfer"})
    with pytest.raises(TransferNotFound):
        await client.pull(ghost, BufferDestination(params.header))
