"""Replica arithmetic (DESIGN §7) on hand-computed cases; budget clamping; bad metrics -> min."""

from __future__ import annotations

import math

import pytest

from lightspeed.planner.arithmetic import (
    Budget,
    EngineLimits,
    Observation,
    ReplicaPlan,
    SlaTarget,
    aggregated_replicas,
    clamp_replicas,
    decode_batch,
    decode_replicas,
    effective_isl,
    load_step,
    plan_replicas,
    prefill_replicas,
    prefill_wall_seconds,
)
from lightspeed.protocol import PerfModel

# A linear model easy to compute by hand: prefill_ms(t) = 0.01 t + 10; decode_ms(p) = 40 p + 5.
LINEAR = PerfModel(prefill_coeffs=(0.0, 0.01, 10.0), decode_coeffs=(0.0, 40.0, 5.0), decode_floor_ms=1.0)
DYNAMO = (
    PerfModel.dynamo_default()
)  # prefill 4.209989e-7 t^2 + 0.01518344 t + 16.50142; decode -25.74 p^2 + 54.01 p + 5.74
LIMITS = EngineLimits(kv_capacity_tokens=100_000, max_num_seqs=256)
SLA = SlaTarget(ttft_s=2.0, itl_s=0.025)
BIG = Budget(max_workers=1000)


# ---- prefill ----------------------------------------------------------------------------------


def test_effective_isl() -> None:
    assert effective_isl(1000, 0.5) == 500  # 1000 * (1 - 0.5)
    assert effective_isl(1000, 0.99) == pytest.approx(50)  # hit capped at 0.95: 1000 * 0.05
    assert effective_isl(1000, math.nan) == 1000  # unknown hit rate: no credit
    assert effective_isl(1000, -0.2) == 1000  # negative hit rate: no credit
    assert effective_isl(-5, 0.5) == 0


def test_prefill_linear_model() -> None:
    # 500 uncached tokens: 0.01 * 500 + 10 = 15 ms = 0.015 s; engine_rps = 1 / 0.015 = 66.7
    assert prefill_wall_seconds(LINEAR, 1000, 0.5) == pytest.approx(0.015)
    # 100 req/s: 100 / 66.7 = 1.5 -> 2
    assert prefill_replicas(100, 1000, 0.5, LINEAR) == 2
    # 200 req/s: 200 * 0.015 = 3.0 exactly (float noise must not make it 4) -> 3
    assert prefill_replicas(200, 1000, 0.5, LINEAR) == 3
    # 201 req/s: 3.015 -> 4
    assert prefill_replicas(201, 1000, 0.5, LINEAR) == 4


def test_prefill_rounds_tokens_up_and_uses_speedup() -> None:
    # 1001 * 0.5 = 500.5 -> 501 tokens: 15.01 ms; 1000 req/s * 0.01501 s = 15.01 -> 16
    assert prefill_replicas(1000, 1001, 0.5, LINEAR) == 16
    # speedup 2 halves the wall time: 0.0075 s; 200 req/s * 0.0075 = 1.5 -> 2 (was 3)
    fast = PerfModel(LINEAR.prefill_coeffs, LINEAR.decode_coeffs, 1.0, speedup_ratio=2.0)
    assert prefill_replicas(200, 1000, 0.5, fast) == 2


def test_prefill_dynamo_model() -> None:
    # isl 3000, hit 0.5 -> 1500 tokens: 4.209989e-7 * 1500^2 + 0.01518344 * 1500 + 16.50142
    #   = 0.94725 + 22.77516 + 16.50142 = 40.22383 ms; 50 req/s * 0.04022383 s = 2.011 -> 3
    assert prefill_replicas(50, 3000, 0.5, DYNAMO) == 3
    # speedup 10: 0.004022 s per prefill; 50 * 0.004022 = 0.2011 -> 1
    assert prefill_replicas(50, 3000, 0.5, PerfModel.dynamo_default(10.0)) == 1


# ---- decode -----------------------------------------------------------------------------------


def test_decode_linear_model() -> None:
    # context 1000 + 200 / 2 = 1100 tokens; ITL 25 ms: 40 p + 5 <= 25 -> p <= 0.5
    # p = 1100 bs / 100000 <= 0.5 -> bs <= 45.45 -> bs 45, p 0.495, step 40 * 0.495 + 5 = 24.8 ms
    bs, step = decode_batch(LINEAR, 1100, 0.025, LIMITS)
    assert bs == 45
    assert step == pytest.approx(0.0248)
    # engine_rps = 45 / (200 * 0.0248) = 9.073; 20 req/s / 9.073 = 2.204 -> 3
    assert decode_replicas(20, 1000, 200, 0.025, LINEAR, LIMITS) == 3


def test_decode_capped_by_max_num_seqs() -> None:
    # max 16 sequences: p = 1100 * 16 / 100000 = 0.176, step 40 * 0.176 + 5 = 12.04 ms
    # engine_rps = 16 / (200 * 0.01204) = 6.645; 20 / 6.645 = 3.01 -> 4
    limits = EngineLimits(kv_capacity_tokens=100_000, max_num_seqs=16)
    bs, step = decode_batch(LINEAR, 1100, 0.025, limits)
    assert bs == 16
    assert step == pytest.approx(0.01204, rel=1e-9)
    assert decode_replicas(20, 1000, 200, 0.025, LINEAR, limits) == 4


def test_decode_capped_by_kv_capacity() -> None:
    # 5000 KV tokens hold 5000 // 1100 = 4 sequences, however loose the ITL target
    assert decode_batch(LINEAR, 1100, 1.0, EngineLimits(kv_capacity_tokens=5000))[0] == 4


def test_decode_unattainable_itl_falls_back_to_batch_one() -> None:
    # ITL 4 ms < 5 ms floor of the fit: bs 1, p = 0.011, step 5.44 ms
    # engine_rps = 1 / (200 * 0.00544) = 0.919; 20 / 0.919 = 21.76 -> 22, clamped to a budget of 8
    bs, step = decode_batch(LINEAR, 1100, 0.004, LIMITS)
    assert bs == 1
    assert step == pytest.approx(0.00544, rel=1e-9)
    assert decode_replicas(20, 1000, 200, 0.004, LINEAR, LIMITS) == 22
    assert clamp_replicas(22, Budget(max_workers=8)) == 8


def test_decode_dynamo_model() -> None:
    # isl 3000, osl 500: context 3250; ITL 30 ms
    # bs 20: p = 3250 * 20 / 100000 = 0.65: -25.74 * 0.4225 + 54.01 * 0.65 + 5.74 = 29.971 ms <= 30
    # bs 21: p = 0.6825: -25.74 * 0.46581 + 54.01 * 0.6825 + 5.74 = 30.612 ms > 30
    bs, step = decode_batch(DYNAMO, 3250, 0.030, LIMITS)
    assert bs == 20
    assert step == pytest.approx(0.02997135, rel=1e-9)
    # engine_rps = 20 / (500 * 0.02997135) = 1.3346; 10 req/s / 1.3346 = 7.49 -> 8
    assert decode_replicas(10, 3000, 500, 0.030, DYNAMO, LIMITS) == 8


# ---- whole plan and budget ----------------------------------------------------------------------


def test_plan_dynamo_model_and_budget_clamp() -> None:
    # decode 8 from the case above; aggregated: 10 * (0.04022383 + 500 * 0.02997135 / 20) = 7.895 -> 8
    obs = Observation(request_rate=10, isl=3000, osl=500, prefix_hit_rate=0.5)
    sla = SlaTarget(ttft_s=2.0, itl_s=0.030)
    # prefill at 10 req/s: 10 * 0.04022383 = 0.402 -> 1
    assert plan_replicas(obs, sla, BIG, DYNAMO, LIMITS) == ReplicaPlan(prefill=1, decode=8, aggregated=8)
    # budget of 6: decode and aggregated clamp to 6
    assert plan_replicas(obs, sla, Budget(max_workers=6), DYNAMO, LIMITS) == ReplicaPlan(1, 6, 6)
    # budget floor of 2: prefill rises to 2
    assert plan_replicas(obs, sla, Budget(max_workers=6, min_workers=2), DYNAMO, LIMITS) == ReplicaPlan(2, 6, 6)


def test_aggregated_time_shares_both_phases() -> None:
    # isl 1000, hit 0.5: prefill 15 ms; decode bs 45 at 24.8 ms: 200 * 0.0248 / 45 = 0.110222 s
    # per request 0.125222 s of a worker's time
    limits = LIMITS
    obs = Observation(request_rate=40, isl=1000, osl=200, prefix_hit_rate=0.5)
    # 40 * 0.125222 = 5.0089 -> 6, where max(prefill 1, decode 5) would say 5
    assert aggregated_replicas(obs, 0.025, LINEAR, limits) == 6
    assert prefill_replicas(40, 1000, 0.5, LINEAR) == 1
    assert decode_replicas(40, 1000, 200, 0.025, LINEAR, limits) == 5
    # 20 req/s: 2.5044 -> 3; at 80% utilization 3.1306 -> 4
    slow = Observation(request_rate=20, isl=1000, osl=200, prefix_hit_rate=0.5)
    assert aggregated_replicas(slow, 0.025, LINEAR, limits) == 3
    assert aggregated_replicas(slow, 0.025, LINEAR, limits, utilization=0.8) == 4
    assert aggregated_replicas(Observation(0.0, 1000, 200), 0.025, LINEAR, limits) == 0


def test_utilization_divides_every_pool_demand() -> None:
    obs = Observation(request_rate=40, isl=1000, osl=200, prefix_hit_rate=0.5)
    # prefill 40 / 0.5 * 0.015 = 1.2 -> 2; decode 80 * 0.110222 = 8.82 -> 9; aggregated 10.02 -> 11
    assert plan_replicas(obs, SlaTarget(2.0, 0.025), BIG, LINEAR, LIMITS, utilization=0.5) == ReplicaPlan(2, 9, 11)
    for bad in (0.0, -0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match="utilization"):
            plan_replicas(obs, SlaTarget(2.0, 0.025), BIG, LINEAR, LIMITS, utilization=bad)


@pytest.mark.parametrize(
    "obs",
    [
        Observation(request_rate=0.0, isl=3000, osl=500),
        Observation(request_rate=-3.0, isl=3000, osl=500),
        Observation(request_rate=math.nan, isl=3000, osl=500),
        Observation(request_rate=math.inf, isl=3000, osl=500),
        Observation(request_rate=10.0, isl=math.nan, osl=math.nan),
        Observation(request_rate=10.0, isl=math.inf, osl=math.inf, prefix_hit_rate=math.nan),
        Observation(request_rate=10.0, isl=0.0, osl=0.0),
    ],
)
def test_no_traffic_or_nan_scales_to_min(obs: Observation) -> None:
    budget = Budget(max_workers=8, min_workers=2)
    assert plan_replicas(obs, SLA, budget, DYNAMO, LIMITS) == ReplicaPlan(2, 2, 2)


def test_huge_demand_clamps_to_max() -> None:
    obs = Observation(request_rate=1e300, isl=3000, osl=500)
    assert plan_replicas(obs, SLA, Budget(max_workers=8), DYNAMO, LIMITS) == ReplicaPlan(8, 8, 8)


def test_clamp_replicas() -> None:
    budget = Budget(max_workers=5, min_workers=2)
    assert [clamp_replicas(n, budget) for n in (0, 1, 2, 4, 5, 6, 100)] == [2, 2, 2, 4, 5, 5, 5]


@pytest.mark.parametrize(("max_workers", "min_workers"), [(0, 1), (4, 0), (2, 3), (True, 1), (2.5, 1)])
def test_bad_budget_raises(max_workers: int, min_workers: int) -> None:
    with pytest.raises(ValueError):
        Budget(max_workers=max_workers, min_workers=min_workers)


@pytest.mark.parametrize(("ttft", "itl"), [(0.0, 0.05), (2.0, -1.0), (math.nan, 0.05), (2.0, math.inf)])
def test_bad_sla_raises(ttft: float, itl: float) -> None:
    with pytest.raises(ValueError):
        SlaTarget(ttft_s=ttft, itl_s=itl)


def test_bad_engine_limits_raise() -> None:
    with pytest.raises(ValueError):
        EngineLimits(kv_capacity_tokens=0)
    with pytest.raises(ValueError):
        EngineLimits(kv_capacity_tokens=1000, max_num_seqs=0)


# ---- load mode ----------------------------------------------------------------------------------


def test_load_step_up_down_hold() -> None:
    sla = SlaTarget(ttft_s=2.0, itl_s=0.05)
    assert load_step(3, 2.5, 0.01, sla) == 1  # TTFT over target
    assert load_step(3, 0.1, 0.06, sla) == 1  # ITL over target
    assert load_step(3, 0.9, 0.02, sla) == -1  # both under half their targets (1.0 s, 25 ms)
    assert load_step(3, 1.5, 0.02, sla) == 0  # TTFT between 1.0 and 2.0: hold
    assert load_step(3, 0.9, 0.03, sla) == 0  # ITL between 25 and 50 ms: hold
    assert load_step(3, 1.5, 0.03, sla, low_watermark=0.8) == -1  # under 1.6 s and 40 ms


def test_load_step_missing_metrics() -> None:
    sla = SlaTarget(ttft_s=2.0, itl_s=0.05)
    assert load_step(3, None, None, sla) == -1  # no traffic: toward min
    assert load_step(3, math.nan, math.nan, sla) == -1
    assert load_step(1, None, None, sla) == 0  # already at min 1
    assert load_step(3, math.nan, 0.06, sla) == 1  # the known metric is over
    assert load_step(3, None, 0.01, sla) == -1  # the known metric is well under


def test_load_step_clamped_to_budget() -> None:
    sla = SlaTarget(ttft_s=2.0, itl_s=0.05)
    budget = Budget(max_workers=4, min_workers=2)
    assert load_step(4, 3.0, 0.01, sla, budget=budget) == 0  # at max
    assert load_step(2, 0.1, 0.01, sla, budget=budget) == 0  # at min
    assert load_step(7, 3.0, 0.01, sla, budget=budget) == -3  # outside the budget: back to 4
    assert load_step(0, 0.1, 0.01, sla, budget=budget) == 2  # below it: up to 2


@pytest.mark.parametrize("watermark", [0.0, 1.0, -0.5, math.nan])
def test_load_step_bad_watermark(watermark: float) -> None:
    with pytest.raises(ValueError):
        load_step(3, 1.0, 0.01, SLA, low_watermark=watermark)


def test_load_step_bad_current() -> None:
    with pytest.raises(ValueError):
        load_step(-1, 1.0, 0.01, SLA)
