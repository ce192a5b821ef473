"""KV-aware routing across real processes: mocker worker subprocesses, in-process frontends.

The frontends run in the test's event loop so the tests can read the router's index and active
set directly; everything between them and the workers (discovery files, request plane, ZMQ KV
events, router-sync between replicas) is the real thing on loopback.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest

from lightspeed.config import FrontendConfig, PlaneConfig, RouterConfig
from lightspeed.frontend.process import Frontend
from lightspeed.router.active import LoadChange
from lightspeed.router.indexer import ApproxIndex, KvIndex
from lightspeed.router.kv_router import KvSelector
from tests.integration.conftest import MODEL
from tests.polling import until

BS = 16
A, B, C, D, E, F = ([1000 + k * 100 + i for i in range(BS)] for k in range(6))


def start_worker(discovery: Path, *extra: str) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable,
        "-m",
        "lightspeed",
        "worker",
        "--engine",
        "mocker",
        "--block-size",
        str(BS),
        "--num-gpu-blocks",
        "512",
        "--speedup-ratio",
        "50",
        "--discovery",
        "file",
        "--discovery-path",
        str(discovery),
        "--discovery-ttl",
        "3",
        *extra,
    ]
    return subprocess.Popen(cmd, start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def stop_worker(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
def discovery_dir(tmp_path: Path) -> Path:
    return tmp_path / "discovery"


@pytest.fixture
def workers(discovery_dir: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs = [start_worker(discovery_dir), start_worker(discovery_dir)]
    yield procs
    for proc in procs:
        stop_worker(proc)


def frontend_config(discovery: Path, mode: str = "kv", **router: object) -> FrontendConfig:
    planes = PlaneConfig(discovery="file", discovery_path=str(discovery), discovery_ttl=3)
    return FrontendConfig(port=0, router_mode=mode, planes=planes, router=RouterConfig(**router))  # type: ignore[arg-type]


async def started(cfg: FrontendConfig, num_workers: int = 2) -> Frontend:
    frontend = Frontend(cfg)
    await frontend.start()
    await until(lambda: len(frontend.models.all_workers()) == num_workers, what="workers in discovery")
    return frontend


@pytest.fixture
async def kv_frontend(discovery_dir: Path, workers: list[subprocess.Popen[bytes]]) -> AsyncIterator[Frontend]:
    frontend = await started(frontend_config(discovery_dir))
    yield frontend
    await frontend.stop()


def worker_ids(frontend: Frontend) -> list[str]:
    return sorted(c.instance_id for c in frontend.models.all_workers())


def index_of(frontend: Frontend) -> KvIndex:
    selector = frontend.router.selector
    assert isinstance(selector, KvSelector) and isinstance(selector.index, KvIndex)
    return selector.index


async def complete(
    frontend: Frontend, prompt: list[int], max_tokens: int = 2, headers: dict[str, str] | None = None
) -> tuple[int, dict]:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"http://127.0.0.1:{frontend.port}/v1/completions", json=body, headers=headers or {}) as resp,
    ):
        return resp.status, await resp.json()


def cached(body: dict) -> int:
    return body["usage"]["prompt_tokens_details"]["cached_tokens"]


async def seed(frontend: Frontend, worker: str, *prompts: list[int]) -> None:
    """Put prompts in `worker`'s cache (pinned) and wait until the router's index shows them."""
    index = index_of(frontend)
    for prompt in prompts:
        before = index.worker_blocks(worker)
        status, _ = await complete(frontend, prompt, headers={"x-worker-instance-id": worker})
        assert status == 200
        await until(lambda before=before: index.worker_blocks(worker) > before, what="KV events in the index")


async def test_request_goes_to_the_worker_with_the_longest_cached_prefix(kv_frontend: Frontend) -> None:
    a, b = worker_ids(kv_frontend)
    await seed(kv_frontend, a, A + B, A + C + D)
    await seed(kv_frontend, b, A + C + E)
    status, body = await complete(kv_frontend, A + C + D + F)
    assert status == 200 and cached(body) == 3 * BS  # only worker a holds [A, C, D]
    status, body = await complete(kv_frontend, A + C + E + F)
    assert status == 200 and cached(body) == 3 * BS  # and only b holds [A, C, E]
    metrics = kv_frontend.http.metrics.render().decode()
    assert 'lightspeed_router_overhead_seconds_count{phase="total"} 2.0' in metrics
    assert 'lightspeed_router_overhead_seconds_count{phase="hash"} 2.0' in metrics


async def test_lost_events_are_recovered_from_a_dump(kv_frontend: Frontend) -> None:
    a, _ = worker_ids(kv_frontend)
    await seed(kv_frontend, a, A + B)
    feed = kv_frontend.kv_feed
    assert feed is not None
    card = next(c for c in kv_frontend.models.all_workers() if c.instance_id == a)
    feed._sub.disconnect(card.events_address)  # events published now are lost to the router
    pin = {"x-worker-instance-id": a}
    status, _ = await complete(kv_frontend, C + D + E, headers=pin)
    assert status == 200
    # A window in which the lost events would have arrived (they are published before the
    # response ends): a fixed wait, since what is checked is that nothing happens.
    await asyncio.sleep(0.3)
    assert index_of(kv_frontend).find_matches(_hashes(C + D + E)).get(a) is None
    feed._sub.connect(card.events_address)
    resyncs = feed.resynced
    probes = iter(range(8000, 9000))

    async def gap_revealed() -> bool:
        # A ZMQ subscriber misses what is published before its reconnect completes, and nothing
        # reports when that is: store fresh blocks (each a new event) until one gets through,
        # which reveals the gap in the event ids and triggers the resync.
        if feed.resynced == resyncs:
            assert (await complete(kv_frontend, [next(probes)] * BS, headers=pin))[0] == 200
        return feed.resynced > resyncs

    await until(gap_revealed, interval=0.1, what="a resync after the gap")
    index = index_of(kv_frontend)
    await complete(kv_frontend, F + F, headers=pin)
    await until(lambda: index.find_matches(_hashes(F + F)).get(a) == 2, what="events after the resync")
    assert index.find_matches(_hashes(C + D + E)) == {a: 3}  # recovered from the dump
    assert index.find_matches(_hashes(A + B)) == {a: 2}


async def test_a_worker_that_leaves_takes_its_blocks_with_it(
    kv_frontend: Frontend, workers: list[subprocess.Popen[bytes]]
) -> None:
    ids = worker_ids(kv_frontend)
    for wid in ids:
        await seed(kv_frontend, wid, A + B)
    index = index_of(kv_frontend)
    assert set(index.find_matches(_hashes(A + B))) == set(ids)
    pid_to_id = {c.pid: c.instance_id for c in kv_frontend.models.all_workers()}
    stop_worker(workers[1])
    gone = pid_to_id[workers[1].pid]
    await until(lambda: gone not in worker_ids(kv_frontend), what="deregistration")
    assert index.worker_blocks(gone) == 0 and gone not in index.workers()
    assert set(index.find_matches(_hashes(A + B))) == set(ids) - {gone}
    status, body = await complete(kv_frontend, A + B + C)
    assert status == 200 and cached(body) == 2 * BS


async def test_approximate_mode_follows_its_own_decisions_until_the_ttl(
    discovery_dir: Path, workers: list[subprocess.Popen[bytes]]
) -> None:
    frontend = await started(frontend_config(discovery_dir, kv_events=False, approx_ttl=1.0))
    try:
        assert frontend.kv_feed is None
        selector = frontend.router.selector
        assert isinstance(selector, KvSelector) and isinstance(selector.index, ApproxIndex)
        for i in range(4):  # the same prefix keeps going to the worker that has it
            last_decision = time.monotonic()  # each decision re-records the prefix (restarts its TTL)
            status, body = await complete(frontend, A + B + C + [2000 + i])
            assert status == 200 and cached(body) == (0 if i == 0 else 3 * BS)
        assert len(selector.index.find_matches(_hashes(A + B + C))) == 1
        await until(lambda: selector.index.find_matches(_hashes(A + B + C)) == {}, timeout=10, what="expiry")
        assert time.monotonic() - last_decision >= 1.0  # not before the TTL
    finally:
        await frontend.stop()


async def test_two_replicas_share_active_load(discovery_dir: Path, workers: list[subprocess.Popen[bytes]]) -> None:
    cfg = frontend_config(discovery_dir)
    f1, f2 = await started(cfg), await started(cfg)
    try:
        assert f1.replicas is not None and f2.replicas is not None
        await until(
            lambda: (
                f1.replicas.peers == [f2.replicas.router_id]  # type: ignore[union-attr]
                and f2.replicas.peers == [f1.replicas.router_id]
            ),
            what="replicas to find each other",
        )  # type: ignore[union-attr]
        await until(lambda: all([hears(f1, f2), hears(f2, f1)]), interval=0.1, what="router-sync subscriptions")
        tasks = []
        for i, frontend in enumerate((f1, f2, f1, f2)):
            prompt = [3000 + 100 * i + j for j in range(4 * BS)]
            tasks.append(asyncio.create_task(complete(frontend, prompt, max_tokens=5000)))
            await until(
                lambda n=i + 1: f1.active.total_requests == n and f2.active.total_requests == n,
                timeout=10,
                what="the decision to reach both replicas",
            )
        per_worker = sorted(f1.active.get(w).requests for w in worker_ids(f1))
        assert per_worker == [2, 2]  # each replica saw the other's load and balanced with it
        assert [f2.active.get(w).requests for w in worker_ids(f1)] == [
            f1.active.get(w).requests for w in worker_ids(f1)
        ]
        for status, _ in await asyncio.gather(*tasks):
            assert status == 200
        await until(lambda: f1.active.total_requests == 0 and f2.active.total_requests == 0, what="frees")
    finally:
        await f1.stop()
        await f2.stop()


async def test_busy_workers_queue_and_a_full_queue_is_503(
    discovery_dir: Path, workers: list[subprocess.Popen[bytes]]
) -> None:
    # A 64-token prompt holds 4 of 512 blocks (0.8%): above 0.5% a worker is busy.
    cfg = frontend_config(discovery_dir, busy_decode_threshold=0.005, max_queue=1)
    frontend = await started(cfg)
    try:
        running = [asyncio.create_task(complete(frontend, [4000 + i] * (4 * BS), max_tokens=5000)) for i in range(2)]
        await until(lambda: frontend.active.total_requests == 2, what="both workers busy")
        queued = asyncio.create_task(complete(frontend, [5000] * (4 * BS)))
        selector = frontend.router.selector
        assert isinstance(selector, KvSelector)
        await until(lambda: len(selector.queue) == 1, what="a queued request")
        status, body = await complete(frontend, [6000] * (4 * BS))
        assert status == 503 and body["error"]["type"] == "service_unavailable"
        assert not queued.done()
        for status, _ in await asyncio.gather(*running, queued):
            assert status == 200
    finally:
        await frontend.stop()


async def test_session_affinity_and_bad_router_overrides(kv_frontend: Frontend) -> None:
    headers = {"x-session-id": "chat-1"}
    status, _ = await complete(kv_frontend, [7000] * BS, headers=headers)
    bound = kv_frontend.router.sessions.lookup("chat-1")
    assert status == 200 and bound in worker_ids(kv_frontend)
    for i in range(3):  # different prompts, same session: same worker
        status, _ = await complete(kv_frontend, [7100 + i] * BS, headers=headers)
        assert status == 200 and kv_frontend.router.sessions.lookup("chat-1") == bound
    status, body = await complete(kv_frontend, [1] * BS, headers={"x-router-temperature": "hot"})
    assert status == 400 and "x-router-temperature" in body["error"]["message"]


def hears(sender: Frontend, receiver: Frontend) -> bool:
    """Probe a router-sync subscription: a no-op change (free of an unknown request), sent again
    on each poll, until the receiver mirrors one. A ZMQ subscriber drops what is published
    before its connect completes, and nothing else reports that moment."""
    assert sender.replicas is not None and receiver.replicas is not None
    if receiver.replicas.mirrored > 0:
        return True
    sender.replicas._broadcast(LoadChange("free", f"probe-{uuid.uuid4().hex}"))
    return False


def _hashes(tokens: list[int]) -> list[int]:
    from lightspeed.kv_hashing import compute_block_hashes, compute_seq_hashes

    return compute_seq_hashes(compute_block_hashes(tokens, BS))


def test_config_is_rejected_early() -> None:
    with pytest.raises(ValueError, match="queue_policy"):
        RouterConfig(queue_policy="random")
    with pytest.raises(ValueError, match="router_mode"):
        replace(frontend_config(Path("/tmp")), router_mode="magic")
