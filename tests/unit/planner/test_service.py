"""The planner loop with a fake clock: priming, one decision per interval, the decision log and
/metrics, dry run, and the failure paths (a failed observation sizes to the minimum, a failing
connector is recorded and retried, nothing stops the loop)."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import msgspec
import pytest

from lightspeed.planner.arithmetic import Budget, EngineLimits, SlaTarget
from lightspeed.planner.connectors import ScaleResult
from lightspeed.planner.core import Decision, Planner, PlannerConfig
from lightspeed.planner.metrics import PlannerMetrics
from lightspeed.planner.observe import FrontendInterval, IntervalObservation
from lightspeed.planner.planner_cli import engine_limits, is_worker
from lightspeed.planner.service import DecisionRecord, PlannerService
from lightspeed.planner.sources import FrontendObserver, PlannerObserver
from lightspeed.protocol import PerfModel, WorkerCard

# prefill_ms(t) = 0.01 t + 10; decode_ms(p) = 40 p + 5 (as in test_core.py)
LINEAR = PerfModel(prefill_coeffs=(0.0, 0.01, 10.0), decode_coeffs=(0.0, 40.0, 5.0), decode_floor_ms=1.0)
SLA = SlaTarget(ttft_s=2.0, itl_s=0.025)
LIMITS = EngineLimits(kv_capacity_tokens=100_000, max_num_seqs=256)


def interval(rate: float, ttft: float | None = 0.5) -> IntervalObservation:
    f = FrontendInterval(10.0, rate * 10, 0, rate, 1000.0, 100.0, 0.5, ttft, ttft, 0.01, 0.02)
    return IntervalObservation(f)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    async def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += s
        await asyncio.sleep(0)

    def time(self) -> float:
        return self.now


class Script:
    """Observations in order; an Exception item is raised."""

    def __init__(self, items: list[IntervalObservation | Exception]) -> None:
        self.items = list(items)
        self.calls = 0

    async def __call__(self) -> IntervalObservation:
        self.calls += 1
        item = self.items.pop(0)
        if isinstance(item, Exception):
            raise item
        return item


class FakeConnector:
    name = "fake"

    def __init__(self, running: int = 1, fail_on: int = 0) -> None:
        self.running = running
        self.calls: list[int] = []
        self.fail_on = fail_on  # raise on this call number (1-based; 0 = never)

    async def current(self) -> int | None:
        return self.running

    async def scale(self, target: int, decision: Decision) -> ScaleResult:
        self.calls.append(target)
        if len(self.calls) == self.fail_on:
            raise RuntimeError("api down")
        self.running = target
        return ScaleResult(target, True, "ok")

    async def close(self) -> None:
        return None


def service(
    items: list[IntervalObservation | Exception], conn: FakeConnector, clock: FakeClock, **kw: object
) -> PlannerService:
    cfg = PlannerConfig(SLA, Budget(max_workers=10, min_workers=1), LIMITS)
    return PlannerService(
        Planner(cfg, LINEAR, conn.running),
        Script(items),
        conn,  # type: ignore[arg-type]
        interval_s=30.0,
        sleep=clock.sleep,
        clock=clock.time,
        **kw,  # type: ignore[arg-type]
    )


async def run_steps(svc: PlannerService, clock: FakeClock, n: int) -> None:
    stop = asyncio.Event()
    original = clock.sleep

    async def sleep(s: float) -> None:
        if len(svc.records) >= n:
            stop.set()
        await original(s)

    svc._sleep = sleep
    await svc.run(stop)


async def test_loop_primes_then_decides_once_per_interval(tmp_path: Path) -> None:
    clock, conn = FakeClock(), FakeConnector(running=1)
    log = tmp_path / "decisions.jsonl"
    metrics = PlannerMetrics()
    svc = service([interval(0), interval(100.0), interval(10.0)], conn, clock, decision_log=log, metrics=metrics)
    await run_steps(svc, clock, 2)
    # the priming observation is discarded; then 100 req/s -> 7 workers (hand-computed in
    # test_core.py), 10 req/s -> ceil(10 * 0.0676) = 1
    assert conn.calls == [7, 1]
    assert clock.slept == [30.0, 30.0, 30.0]
    assert [r.time for r in svc.records] == [1030.0, 1060.0]
    lines = [msgspec.json.decode(ln, type=DecisionRecord) for ln in log.read_bytes().splitlines()]
    assert lines == svc.records
    assert lines[0].decision.replicas == 7 and lines[0].extra["ttft_p90_s"] == 0.5
    assert lines[0].result == ScaleResult(7, True, "ok")
    text = metrics.render().decode()
    assert 'lightspeed_planner_decided_replicas{pool="aggregated"} 1.0' in text
    assert 'lightspeed_planner_observed{field="request_rate"} 10.0' in text
    assert 'lightspeed_planner_forecast{field="request_rate"} 10.0' in text
    assert "lightspeed_planner_decisions_total 2.0" in text


async def test_failed_observation_sends_the_fleet_to_its_minimum() -> None:
    clock, conn = FakeClock(), FakeConnector(running=5)
    svc = service([interval(0), RuntimeError("scrape bug"), IntervalObservation(None)], conn, clock)
    await svc.prime()
    first = await svc.step()
    second = await svc.step()
    assert conn.calls == [1, 1]
    assert first.decision.observed["request_rate"] is None and second.decision.replicas == 1


async def test_a_failing_connector_is_recorded_and_the_loop_goes_on() -> None:
    clock, conn = FakeClock(), FakeConnector(running=1, fail_on=1)
    metrics = PlannerMetrics()
    svc = service([interval(0), interval(100.0), interval(100.0)], conn, clock, metrics=metrics)
    await run_steps(svc, clock, 2)
    results = [r.result for r in svc.records]
    assert results[0] is not None and not results[0].acted and "api down" in results[0].detail
    assert results[1] == ScaleResult(7, True, "ok")
    assert "lightspeed_planner_scale_failures_total 1.0" in metrics.render().decode()


async def test_dry_run_decides_but_never_scales() -> None:
    clock, conn = FakeClock(), FakeConnector(running=2)
    svc = service([interval(0), interval(100.0)], conn, clock, dry_run=True)
    await svc.prime()
    record = await svc.step()
    assert conn.calls == [] and record.dry_run and record.result is None and record.decision.replicas == 7


async def test_load_mode_steps_from_what_the_connector_reports() -> None:
    clock, conn = FakeClock(), FakeConnector(running=4)
    cfg = PlannerConfig(SLA, Budget(max_workers=10), LIMITS, mode="load")
    svc = PlannerService(
        Planner(cfg, LINEAR, 1), Script([interval(5.0, ttft=3.0)]), conn, interval_s=1.0, sleep=clock.sleep
    )
    record = await svc.step()
    assert record.decision.replicas == 5  # TTFT 3 s over 2 s: one more than the 4 running


async def test_frontend_observer_answers_none_until_a_second_good_scrape() -> None:
    texts: list[str | Exception] = [
        'lightspeed_frontend_requests_total{model="m",endpoint="e",status="success"} 1\n',
        OSError("refused"),
        'lightspeed_frontend_requests_total{model="m",endpoint="e",status="success"} 21\n',
    ]
    now = [0.0]

    async def fetch() -> str:
        now[0] += 5.0
        item = texts.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    obs = PlannerObserver(FrontendObserver(fetch, clock=lambda: now[0]))
    assert (await obs.observe()).frontend is None  # first scrape: the baseline
    assert (await obs.observe()).frontend is None  # failed: nothing observed
    got = (await obs.observe()).frontend
    assert got is not None and got.seconds == 10.0 and got.request_rate == pytest.approx(2.0)
    assert math.isnan(got.isl)


def test_interval_must_be_positive() -> None:
    cfg = PlannerConfig(SLA, Budget(max_workers=10), LIMITS)
    with pytest.raises(ValueError, match="adjustment_interval"):
        PlannerService(Planner(cfg, LINEAR, 1), Script([]), FakeConnector(), interval_s=0.0)


def test_engine_limits_come_from_worker_cards_only() -> None:
    router = WorkerCard(instance_id="router-1", model="", address="", component="router")
    small = WorkerCard(instance_id="w1", model="m", address="a:1", total_kv_blocks=100, block_size=16, max_num_seqs=4)
    big = WorkerCard(instance_id="w2", model="m", address="a:2", total_kv_blocks=1000, block_size=16, max_num_seqs=8)
    cards = [c for c in (router, small, big) if is_worker(c)]
    assert engine_limits(cards) == EngineLimits(1600, 4)  # the weakest worker; the router ignored
    assert engine_limits([]) == EngineLimits(16384 * 64)
