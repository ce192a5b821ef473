"""The event loop on hand-computed cases: step times, routing choices, the planner at a tick."""

from __future__ import annotations

import dataclasses

import pytest

from lightspeed.config import RouterConfig
from lightspeed.sim.config import PlannerSettings
from lightspeed.sim.fleet import ReplicaPoint

from .cases import config, decode_s, prefill_s, simulate, spec

EXACT = 1e-12


def test_one_request_runs_prefill_then_decode_steps() -> None:
    # 10 prompt tokens -> 3 blocks of 4; outputs 11 and 12 stay inside the third block.
    out = simulate(config(), [spec(range(100, 110), 3)])
    (req,) = out.requests
    first = prefill_s(10)
    gap = decode_s(3)  # each later step is a decode phase only, at 3 / 64 blocks in use
    assert req.first_s == pytest.approx(first, abs=EXACT)
    assert req.itls == pytest.approx([gap, gap], abs=EXACT)
    assert req.end_s == pytest.approx(first + 2 * gap, abs=EXACT)
    assert (req.output_tokens, req.cached_tokens, req.worker_id, req.error) == (3, 0, "worker-0", None)
    assert out.end_s == req.end_s


def test_second_request_waits_for_the_step_in_flight() -> None:
    # Both arrive at 0: A's step starts at once, B joins the next one (A's decode + B's prefill).
    a, b = spec(range(100, 110), 2), spec(range(200, 210), 1)
    out = simulate(config(), [a, b])
    ra, rb = out.requests
    emit1 = prefill_s(10)
    # Step 2 starts after step 1's decode phase (3 blocks held) and prefills B's 10 tokens;
    # its KV usage is after allocation: A 3 blocks + B 3 blocks.
    emit2 = emit1 + decode_s(3) + prefill_s(10)
    assert ra.first_s == pytest.approx(emit1, abs=EXACT)
    assert rb.first_s == pytest.approx(emit2, abs=EXACT)
    assert ra.itls == pytest.approx([emit2 - emit1], abs=EXACT)
    assert ra.end_s == rb.end_s == pytest.approx(emit2, abs=EXACT)


def test_round_robin_alternates_workers() -> None:
    out = simulate(config(workers=2), [spec(range(100, 110), 1, at=i * 0.001) for i in range(4)])
    assert [r.worker_id for r in out.requests] == ["worker-0", "worker-1", "worker-0", "worker-1"]


def test_kv_router_follows_the_cached_prefix_and_spreads_the_rest() -> None:
    shared = list(range(300, 308))  # two full blocks
    first = spec([*shared, 1000, 1001], 1, at=0.0)
    again = spec([*shared, 2000, 2001], 4, at=1.0)  # after `first` finished: its blocks are cached
    other = spec(range(400, 410), 1, at=1.0)  # no overlap anywhere; `again` loads the prefix holder
    out = simulate(config(workers=2, router_mode="kv"), [first, again, other])
    r_first, r_again, r_other = out.requests
    assert r_again.worker_id == r_first.worker_id
    assert r_again.cached_tokens == 8
    assert r_other.worker_id != r_first.worker_id
    assert r_other.cached_tokens == 0
    assert out.kv_events > 0


def test_unfittable_request_fails_with_400_and_others_run() -> None:
    out = simulate(config(), [spec(range(100, 170), 1), spec(range(100, 110), 1, at=0.5)])
    too_long, ok = out.requests
    assert too_long.error == "http_400"
    assert "max_model_len" in (too_long.error_detail or "")
    assert ok.error is None and ok.output_tokens == 1


def test_planner_adds_workers_at_a_tick_after_the_start_delay() -> None:
    # At 1/100 speed a 10-token prefill takes prefill_s(10) * 100 ~ 1.665 s; two arrivals in the
    # first 1 s interval ask for ceil(2 * 1.665) = 4 workers, clamped to max_workers = 3.
    planner = PlannerSettings(
        mode="throughput", max_workers=3, adjustment_interval_s=1.0, start_delay_s=0.5, ttft_slo_s=10.0
    )
    specs = [spec(range(100, 110), 1, at=0.0), spec(range(200, 210), 1, at=0.2), spec(range(300, 310), 1, at=1.6)]
    out = simulate(config(planner=planner, speedup_ratio=0.01), specs)
    assert out.decisions[0].replicas == 3
    assert out.decisions[0].observed["request_rate"] == 2.0
    assert ReplicaPoint(1.0, 1, 3) in out.replicas  # two launched at the tick, still starting
    assert ReplicaPoint(1.5, 3, 3) in out.replicas  # both serve after the 0.5 s start delay
    assert out.requests[2].worker_id in ("worker-1", "worker-2")  # round-robin over three


def test_planner_drains_idle_workers_down_to_the_minimum() -> None:
    planner = PlannerSettings(mode="load", max_workers=3, adjustment_interval_s=1.0, start_delay_s=0.0)
    specs = [spec(range(100, 110), 1, at=0.0), spec(range(100, 110), 1, at=2.5)]
    out = simulate(config(workers=3, planner=planner), specs)
    # Load mode: latencies far under the SLA -> one fewer worker per tick, never below 1.
    assert [d.replicas for d in out.decisions] == [2, 1]
    assert out.replicas[-1] == ReplicaPoint(2.0, 1, 1)
    assert out.worker_seconds == pytest.approx(1.0 + 2.0 + out.end_s, abs=EXACT)


def test_same_seed_gives_identical_outcomes() -> None:
    specs = [spec(range(100 + i, 120 + i), 5, at=i * 0.003) for i in range(30)]
    runs = [simulate(config(workers=3, router_mode="kv"), specs) for _ in range(2)]
    a, b = ([(r.worker_id, r.first_s, r.itls, r.end_s, r.cached_tokens) for r in run.requests] for run in runs)
    assert a == b
    assert runs[0].events == runs[1].events


def test_busy_workers_queue_requests_until_load_is_released() -> None:
    # Busy above 0.001 x 64 queued prefill tokens: the worker is busy while any prefill waits.
    router = RouterConfig(busy_prefill_frac=0.001)
    cfg = config(router_mode="kv")
    cfg = dataclasses.replace(cfg, fleet=dataclasses.replace(cfg.fleet, router=router))
    out = simulate(cfg, [spec(range(100, 110), 5), spec(range(200, 210), 1)])
    ra, rb = out.requests
    emit1 = prefill_s(10)
    # B is routed at A's first token (prefill done), after A's next step (a decode) started;
    # it joins the step after that one, which pays the pending decode phase then B's prefill.
    emit2 = emit1 + decode_s(3)
    emit3 = emit2 + decode_s(3) + prefill_s(10)
    assert ra.first_s == pytest.approx(emit1, abs=EXACT)
    assert rb.first_s == pytest.approx(emit3, abs=EXACT)
    assert ra.itls[:2] == pytest.approx([emit2 - emit1, emit3 - emit2], abs=EXACT)


def test_queue_timeout_fails_the_waiter_with_503() -> None:
    router = RouterConfig(busy_prefill_frac=0.001, queue_timeout=0.001)
    cfg = config(router_mode="kv", speedup_ratio=0.1)  # A's prefill takes ~0.17 s
    cfg = dataclasses.replace(cfg, fleet=dataclasses.replace(cfg.fleet, router=router))
    out = simulate(cfg, [spec(range(100, 110), 1), spec(range(200, 210), 1)])
    assert out.requests[0].error is None
    assert out.requests[1].error == "http_503"
