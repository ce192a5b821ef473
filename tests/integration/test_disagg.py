"""Disaggregated prefill/decode, end to end in one process: a frontend and mocker workers on
in-memory discovery, real request plane, event plane and engines (DESIGN §6)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import msgspec
import pytest

from lightspeed.config import DisaggOptions, FrontendConfig, KvTransferOptions, PlaneConfig, WorkerConfig
from lightspeed.disagg.flow import DisaggFlow
from lightspeed.frontend.openai_types import CompletionRequest
from lightspeed.frontend.pipeline import new_request_id
from lightspeed.frontend.process import Frontend
from lightspeed.protocol import KvTransferParams, LLMEngineOutput, PreprocessedRequest, StopConditions
from lightspeed.runtime.discovery import MemDiscovery
from lightspeed.runtime.request_plane import RequestPlaneClient
from lightspeed.worker.process import Worker
from tests.polling import until

BLOCK = 16


@dataclass
class Fleet:
    frontend: Frontend
    workers: list[Worker] = field(default_factory=list)

    def role(self, role: str) -> list[Worker]:
        return [w for w in self.workers if w.cfg.role == role]

    @property
    def model(self) -> str:
        return self.frontend.models.models()[0].name

    async def complete(self, prompt: list[int], max_tokens: int = 8, pinned: str | None = None) -> list[int]:
        req = CompletionRequest(
            model=self.model, prompt=prompt, max_tokens=max_tokens, temperature=0.0, ignore_eos=True
        )
        gen = await self.frontend.pipeline.prepare(req, new_request_id("cmpl"), pinned)
        ids: list[int] = []
        async for delta in self.frontend.pipeline.stream(gen):
            ids += delta.token_ids
        return ids

    def decisions(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for metric in self.frontend.http.metrics.registry.collect():
            if metric.name == "lightspeed_frontend_disagg_decisions":
                for s in metric.samples:
                    if s.name.endswith("_total"):
                        out[s.labels["reason"]] = s.value
        return out

    async def idle(self) -> None:
        """Every worker back to zero active blocks, nothing held, the block accounting intact."""

        def quiet() -> bool:
            return all(
                w.core.stats().active_blocks == 0 and w.disagg is not None and not w.disagg.prefill.held
                for w in self.workers
            )

        await until(quiet, timeout=15, what=lambda: str([(w.cfg.role, w.core.stats()) for w in self.workers]))
        for w in self.workers:
            w.core.kv.check_integrity()


async def start_worker(name: str, role: str, engine: str = "mocker", **kw: object) -> Worker:
    cfg = WorkerConfig(engine=engine, role=role, planes=PlaneConfig(discovery="mem"), block_size=BLOCK, **kw)  # type: ignore[arg-type]
    worker = Worker(cfg, discovery=MemDiscovery(name))
    await worker.start()
    return worker


async def start_fleet(
    roles: list[str], engine: str = "mocker", disagg: DisaggOptions | None = None, **kw: object
) -> Fleet:
    name = f"disagg-{uuid.uuid4().hex}"
    workers = [await start_worker(name, role, engine, **kw) for role in roles]
    cfg = FrontendConfig(
        port=0, router_mode="kv", planes=PlaneConfig(discovery="mem"), disagg=disagg or DisaggOptions()
    )
    frontend = Frontend(cfg, discovery=MemDiscovery(name))
    await frontend.start()
    await until(lambda: len(frontend.models.all_workers()) == len(roles), what="workers in discovery")
    return Fleet(frontend, workers)


async def stop_fleet(fleet: Fleet) -> None:
    await fleet.frontend.stop()
    for w in fleet.workers:
        await w.stop(0.5)


MOCKER = {"speedup_ratio": 20.0, "num_gpu_blocks": 512, "max_num_batched_tokens": 256}


@pytest.fixture
async def fleet_1p1d() -> AsyncIterator[Fleet]:
    fleet = await start_fleet(["prefill", "decode"], **MOCKER)
    yield fleet
    await stop_fleet(fleet)


def prompt(seed: int, n: int) -> list[int]:
    return [(seed * 7919 + i * 104729) % 40000 + 100 for i in range(n)]


async def test_cold_prompt_is_prefilled_remotely_and_streamed_whole(fleet_1p1d: Fleet) -> None:
    (prefill,), (decode,) = fleet_1p1d.role("prefill"), fleet_1p1d.role("decode")
    ids = await fleet_1p1d.complete(prompt(1, 300), max_tokens=10)
    assert len(ids) == 10
    assert fleet_1p1d.decisions() == {"remote": 1.0}
    assert decode.disagg is not None and decode.disagg.decode.num_pulled == 1
    assert decode.disagg.decode.num_local_fallbacks == 0
    assert prefill.core.scheduler.prefix_hit_rate == 0.0 and prefill.core.stats().cached_blocks == 300 // BLOCK
    await fleet_1p1d.idle()
    # the decode worker now caches the prompt's full blocks it imported
    assert decode.core.stats().cached_blocks >= 300 // BLOCK


async def test_decode_side_cache_keeps_the_prefill_local(fleet_1p1d: Fleet) -> None:
    base = prompt(2, 640)
    await fleet_1p1d.complete(base, max_tokens=2)  # remote; the decode worker caches 40 blocks
    await until(
        lambda: fleet_1p1d.frontend.router.selector.index.worker_blocks(fleet_1p1d.role("decode")[0].instance_id) >= 40,
        what="index",
    )  # type: ignore[attr-defined]
    # 640 + 64 new tokens: uncached 64 < 2048 and < 70 % -> local on the decode worker
    ids = await fleet_1p1d.complete(base + prompt(3, 64), max_tokens=4)
    assert len(ids) == 4
    assert fleet_1p1d.decisions() == {"remote": 1.0, "local_small_uncached": 1.0}
    await fleet_1p1d.idle()


async def test_single_token_request_stays_local(fleet_1p1d: Fleet) -> None:
    assert len(await fleet_1p1d.complete(prompt(4, 100), max_tokens=1)) == 1
    assert fleet_1p1d.decisions() == {"local_single_token": 1.0}
    await fleet_1p1d.idle()


async def test_pinned_prefill_worker_skips_the_policy(fleet_1p1d: Fleet) -> None:
    (prefill,) = fleet_1p1d.role("prefill")
    assert len(await fleet_1p1d.complete(prompt(5, 50), max_tokens=1, pinned=prefill.instance_id)) == 1
    assert len(await fleet_1p1d.complete(prompt(6, 50), max_tokens=3, pinned=prefill.instance_id)) == 3
    assert fleet_1p1d.decisions() == {"pinned_prefill": 2.0}
    await fleet_1p1d.idle()


async def test_no_prefill_worker_falls_back_to_aggregated() -> None:
    fleet = await start_fleet(["decode"], **MOCKER)
    try:
        assert len(await fleet.complete(prompt(7, 200), max_tokens=3)) == 3
        assert fleet.decisions() == {"no_prefill_workers": 1.0}
        await fleet.idle()
    finally:
        await stop_fleet(fleet)


async def test_prefill_worker_that_dies_before_the_transfer_is_replaced_by_a_local_prefill(
    fleet_1p1d: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    (prefill,), (decode,) = fleet_1p1d.role("prefill"), fleet_1p1d.role("decode")
    original = DisaggFlow._prefill

    async def prefill_then_die(self: DisaggFlow, *args: object, **kw: object) -> LLMEngineOutput | None:
        out = await original(self, *args, **kw)  # type: ignore[arg-type]
        await prefill.stop(0)  # gone after the first token, before the decode worker pulls
        return out

    monkeypatch.setattr(DisaggFlow, "_prefill", prefill_then_die)
    ids = await fleet_1p1d.complete(prompt(8, 300), max_tokens=6)
    assert len(ids) == 6
    assert decode.disagg is not None and decode.disagg.decode.num_local_fallbacks == 1
    fleet_1p1d.workers.remove(prefill)
    await fleet_1p1d.idle()


async def test_prefill_leg_lost_is_prefilled_on_the_decode_worker(
    fleet_1p1d: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    (prefill,) = fleet_1p1d.role("prefill")
    await prefill.server.stop(0)  # the prefill worker no longer answers: its leg fails to dial
    ids = await fleet_1p1d.complete(prompt(9, 300), max_tokens=5)
    assert len(ids) == 5
    flow = fleet_1p1d.frontend.pipeline._disagg
    assert flow is not None and flow.fallbacks._value.get() == 1.0


async def test_unpulled_transfer_is_released_at_its_deadline() -> None:
    """The decode worker died before pulling: nobody releases, the prefill side's deadline does."""
    name = f"disagg-{uuid.uuid4().hex}"
    prefill = await start_worker(name, "prefill", kv_transfer=KvTransferOptions(timeout=0.5), **MOCKER)
    client = RequestPlaneClient()
    try:
        leg = PreprocessedRequest(
            "r-prefill",
            "m",
            prompt(10, 100),
            stop=StopConditions(max_tokens=8, ignore_eos=True),
            kv_transfer_params=KvTransferParams(do_remote_decode=True),
        )
        assert prefill.card is not None
        stream = await client.stream(prefill.card.address, "generate", msgspec.msgpack.encode(leg))
        outs = [msgspec.msgpack.decode(p, type=LLMEngineOutput) async for p in stream]
        params = outs[-1].kv_transfer_params
        assert params is not None and len(params.block_ids) == 7 and params.num_tokens == 100
        assert len(params.block_hashes) == 6
        assert prefill.core.stats().active_blocks == 7 and prefill.disagg is not None
        assert len(prefill.disagg.prefill.held) == 1
        await until(lambda: prefill.core.stats().active_blocks == 0, timeout=5, what="deadline release")
        assert len(prefill.disagg.prefill.held) == 0 and prefill.disagg.prefill.held.num_expired == 1
        prefill.core.kv.check_integrity()
    finally:
        await client.close()
        await prefill.stop(0)


async def test_many_concurrent_requests_leave_both_sides_idle(fleet_1p1d: Fleet) -> None:
    results = await asyncio.gather(
        *(fleet_1p1d.complete(prompt(20 + i, 100 + 37 * i), max_tokens=5) for i in range(12))
    )
    assert [len(r) for r in results] == [5] * 12
    # 12 prompts at once queue more than 2 x 256 tokens on the one prefill worker: the rest of
    # the burst is prefilled on the decode worker instead of waiting behind it
    decisions = fleet_1p1d.decisions()
    assert sum(decisions.values()) == 12.0 and decisions["remote"] >= 1 and decisions["local_prefill_busy"] >= 1
    await fleet_1p1d.idle()


async def test_unconditional_mode_sends_every_prefill_remote() -> None:
    fleet = await start_fleet(["prefill", "decode"], disagg=DisaggOptions(conditional=False), **MOCKER)
    try:
        results = await asyncio.gather(*(fleet.complete(prompt(40 + i, 100 + 37 * i), max_tokens=5) for i in range(8)))
        assert [len(r) for r in results] == [5] * 8
        assert fleet.decisions() == {"unconditional": 8.0}
        await fleet.idle()
    finally:
        await stop_fleet(fleet)


async def test_client_gone_after_the_first_token_releases_the_prefill_side_at_once(fleet_1p1d: Fleet) -> None:
    (prefill,) = fleet_1p1d.role("prefill")
    req = CompletionRequest(model=fleet_1p1d.model, prompt=prompt(60, 300), max_tokens=50, ignore_eos=True)
    gen = await fleet_1p1d.frontend.pipeline.prepare(req, new_request_id("cmpl"))
    stream = fleet_1p1d.frontend.pipeline.stream(gen)
    first = await stream.__anext__()
    assert len(first.token_ids) == 1
    await stream.aclose()  # the client hangs up on the first token
    assert prefill.disagg is not None
    await until(lambda: not prefill.disagg.prefill.held, timeout=5, what="released well before the 30 s deadline")  # type: ignore[union-attr]
    assert prefill.disagg.prefill.held.num_expired == 0
    await fleet_1p1d.idle()
