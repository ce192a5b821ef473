"""Closed internal planes end to end: a forged worker card in the fleet's discovery folder gets
no prompt, and a caller without the secret gets nothing from a real worker."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import msgspec
import pytest

from lightspeed.errors import WorkerLost
from lightspeed.protocol import PreprocessedRequest, StopConditions, WorkerCard
from lightspeed.runtime.discovery import FileDiscovery
from lightspeed.runtime.request_plane import RequestContext, RequestPlaneClient, RequestPlaneServer
from tests.integration.conftest import MOCKER_ARGS, MODEL, Server, start_serve, stop_serve


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    folder = tmp_path_factory.mktemp("discovery")
    server = start_serve([*MOCKER_ARGS, "--speedup-ratio", "50", "--discovery-path", str(folder)], workers=1)
    yield server, folder
    assert stop_serve(server) == 0


async def test_a_forged_card_in_the_discovery_folder_receives_no_prompt(fleet: tuple[Server, Path]) -> None:
    server, folder = fleet
    stolen: list[bytes] = []

    async def thief(payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        stolen.append(payload)
        yield b""

    fake = RequestPlaneServer()
    fake.register("generate", thief)
    address = await fake.start()
    forger = FileDiscovery(folder, ttl=10, heartbeat_interval=1, poll_interval=0.05)
    await forger.register(WorkerCard("mocker-forged0000", MODEL, address, engine="mocker", total_kv_blocks=16384))
    try:
        await asyncio.sleep(1.0)  # several discovery scans of the frontend
        async with aiohttp.ClientSession() as session:
            for i in range(6):  # round-robin: every second one would go to the forged card
                body = {"model": MODEL, "prompt": f"hello {i}", "max_tokens": 3}
                async with session.post(server.base_url + "/completions", json=body) as resp:
                    assert resp.status == 200, await resp.text()
        assert stolen == []
        assert [w["instance_id"] for w in server.health()["workers"]] != ["mocker-forged0000"]
        assert len(server.health()["workers"]) == 1
    finally:
        await forger.close()
        await fake.stop()


async def test_a_caller_without_the_secret_gets_nothing_from_a_real_worker(fleet: tuple[Server, Path]) -> None:
    server, _ = fleet
    address = str(server.health()["workers"][0]["address"])
    client = RequestPlaneClient(connect_timeout=2.0)
    req = PreprocessedRequest(request_id="raw", model=MODEL, token_ids=[1, 2, 3], stop=StopConditions(max_tokens=2))
    try:
        stream = await client.stream(address, "generate", msgspec.msgpack.encode(req))
        with pytest.raises(WorkerLost):
            async for _ in stream:
                pass
    finally:
        await client.close()
