"""One planner interval end to end on hand-computed numbers: forecast, replicas, the log line."""

from __future__ import annotations

import math

import msgspec
import pytest

from lightspeed.planner.arithmetic import Budget, EngineLimits, Observation, SlaTarget
from lightspeed.planner.core import Decision, Planner, PlannerConfig, decision_log_line
from lightspeed.protocol import PerfModel

# prefill_ms(t) = 0.01 t + 10; decode_ms(p) = 40 p + 5 (as in test_arithmetic.py)
LINEAR = PerfModel(prefill_coeffs=(0.0, 0.01, 10.0), decode_coeffs=(0.0, 40.0, 5.0), decode_floor_ms=1.0)
SLA = SlaTarget(ttft_s=2.0, itl_s=0.025)
LIMITS = EngineLimits(kv_capacity_tokens=100_000, max_num_seqs=256)


def planner(mode: str = "throughput", current: int = 1, max_workers: int = 100) -> Planner:
    cfg = PlannerConfig(SLA, Budget(max_workers=max_workers), LIMITS, mode=mode)  # type: ignore[arg-type]
    return Planner(cfg, LINEAR, current)


def test_throughput_mode_sizes_the_pool_from_the_forecast() -> None:
    p = planner()
    d = p.step(Observation(request_rate=100.0, isl=1000.0, osl=100.0, prefix_hit_rate=0.5))
    # constant predictor: the forecast is what was seen.
    assert d.forecast is not None and (d.forecast.request_rate, d.forecast.isl, d.forecast.osl) == (100, 1000, 100)
    # prefill: 500 uncached tokens -> 15 ms -> 66.7 req/s per engine -> 100 / 66.7 = 1.5 -> 2
    assert d.prefill == 2
    # decode: context 1050 tokens; the largest batch with 40 * (1050 * bs / 100000) + 5 <= 25 ms is
    # bs = 47 (47.6 rounds down), step 24.74 ms; engine_rps = 47 / (100 * 0.02474) = 19.0 req/s;
    # 100 / 19.0 = 5.26 -> 6
    assert d.decode == 6
    # aggregated, both phases time-shared: 100 * (0.015 + 100 * 0.02474 / 47) = 6.76 -> 7
    assert d.replicas == 7 and p.current == 7


def test_throughput_mode_clamps_and_survives_nan() -> None:
    p = planner(max_workers=4)
    assert p.step(Observation(100.0, 1000.0, 100.0, 0.5)).replicas == 4  # 7 clamped to the budget
    # A NaN interval is skipped by the predictor: the last good forecast stands.
    d = p.step(Observation(math.nan, math.nan, math.nan, math.nan))
    assert d.forecast is not None and d.forecast.request_rate == 100.0 and d.replicas == 4
    assert d.observed["request_rate"] is None and d.observed["prefix_hit_rate"] is None


def test_no_traffic_ever_is_the_minimum() -> None:
    d = planner(current=5).step(Observation(0.0, 0.0, 0.0))
    assert d.replicas == 1


def test_load_mode_moves_by_one() -> None:
    p = planner("load", current=3)
    assert p.step(Observation(10.0, 100.0, 10.0, ttft_p50_s=2.5, itl_p50_s=0.01)).replicas == 4  # TTFT over
    assert p.step(Observation(10.0, 100.0, 10.0, ttft_p50_s=0.5, itl_p50_s=0.01)).replicas == 3  # well under
    assert p.step(Observation(10.0, 100.0, 10.0, ttft_p50_s=1.5, itl_p50_s=0.02)).replicas == 3  # in band
    assert p.interval == 3


def test_decision_log_line_is_one_json_object() -> None:
    d = planner().step(Observation(100.0, 1000.0, 100.0, 0.5, ttft_p50_s=math.inf))
    line = decision_log_line(d)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    back = msgspec.json.decode(line, type=Decision)
    assert back == d and back.observed["ttft_p50_s"] is None


def test_bad_config_is_refused() -> None:
    with pytest.raises(ValueError, match="mode"):
        PlannerConfig(SLA, Budget(max_workers=2), LIMITS, mode="chaos")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        PlannerConfig(SLA, Budget(max_workers=2), LIMITS, predictor="crystal-ball")
