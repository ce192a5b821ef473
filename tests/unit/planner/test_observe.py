"""Observers on hand-written Prometheus text: exact interval deltas, quantiles, hit rate; the
forward-pass aggregation; missing metrics give NaN (never an exception)."""

from __future__ import annotations

import math

import pytest

from lightspeed.planner.observe import (
    ForwardPassAggregator,
    HistogramSample,
    IntervalObservation,
    frontend_interval,
    parse_frontend_metrics,
)
from lightspeed.protocol import ForwardPassMetrics


def hist(name: str, buckets: list[tuple[str, float]], total: float, model: str = "m") -> str:
    lines = [f"# TYPE {name} histogram"]
    lines += [f'{name}_bucket{{le="{le}",model="{model}"}} {n}' for le, n in buckets]
    lines += [f'{name}_count{{model="{model}"}} {buckets[-1][1]}', f'{name}_sum{{model="{model}"}} {total}']
    return "\n".join(lines)


def scrape(
    success: float,
    s503: float,
    s400: float,
    ttft: list[float],
    itl: list[float],
    isl: tuple[float, float],
    osl: tuple[float, float],
    cached: float,
    inflight: float = 0.0,
) -> str:
    """A frontend /metrics text. ttft / itl: cumulative counts at le=0.1, 1, +Inf (resp. 0.01, 0.05, +Inf);
    isl / osl: (count, sum)."""
    req = "lightspeed_frontend_requests_total"
    parts = [
        f"# TYPE {req} counter",
        f'{req}{{endpoint="completions",model="m",status="success"}} {success}',
        f'{req}{{endpoint="completions",model="m",status="503"}} {s503}',
        f'{req}{{endpoint="completions",model="m",status="400"}} {s400}',
        hist("lightspeed_frontend_time_to_first_token_seconds", list(zip(["0.1", "1.0", "+Inf"], ttft)), 0.0),
        hist("lightspeed_frontend_inter_token_latency_seconds", list(zip(["0.01", "0.05", "+Inf"], itl)), 0.0),
        hist("lightspeed_frontend_input_sequence_tokens", [("+Inf", isl[0])], isl[1]),
        hist("lightspeed_frontend_output_sequence_tokens", [("+Inf", osl[0])], osl[1]),
        "# TYPE lightspeed_frontend_cached_tokens counter",
        f'lightspeed_frontend_cached_tokens_total{{model="m"}} {cached}',
        "# TYPE lightspeed_frontend_inflight_requests gauge",
        f'lightspeed_frontend_inflight_requests{{model="m"}} {inflight}',
    ]
    return "\n".join(parts) + "\n"


BEFORE = scrape(10, 1, 5, [5, 10, 10], [100, 200, 200], (10, 10_000), (10, 1_000), 2_000, inflight=4)
AFTER = scrape(30, 3, 50, [5, 30, 30], [100, 500, 600], (30, 50_000), (30, 5_000), 12_000, inflight=7)


def test_interval_is_the_difference_of_two_scrapes() -> None:
    got = frontend_interval(parse_frontend_metrics(BEFORE), parse_frontend_metrics(AFTER), 10.0)
    # arrivals: 20 served + 2 refused with 503 + 3 more in flight; the 45 new 400s are not demand
    assert got.requests == 25
    assert got.refused == 2
    assert got.request_rate == pytest.approx(2.5)
    assert got.isl == pytest.approx(40_000 / 20)  # delta sum / delta count, not the lifetime 50000/30
    assert got.osl == pytest.approx(4_000 / 20)
    assert got.prefix_hit_rate == pytest.approx(10_000 / 40_000)
    # TTFT: all 20 new observations in (0.1, 1]: p50 = 0.1 + 0.9 * 10/20, p90 = 0.1 + 0.9 * 18/20
    assert got.ttft_p50_s == pytest.approx(0.55)
    assert got.ttft_p90_s == pytest.approx(0.91)
    # ITL: 300 new in (0.01, 0.05], 100 in (0.05, +Inf): p50 rank 200 -> 0.01 + 0.04 * 200/300;
    # p90 rank 360 falls in +Inf -> the largest finite bound
    assert got.itl_p50_s == pytest.approx(0.01 + 0.04 * 200 / 300)
    assert got.itl_p90_s == pytest.approx(0.05)


def test_no_traffic_gives_nan_means_and_no_latencies() -> None:
    snap = parse_frontend_metrics(BEFORE)
    got = frontend_interval(snap, snap, 10.0)
    assert got.request_rate == 0.0
    assert math.isnan(got.isl) and math.isnan(got.osl) and math.isnan(got.prefix_hit_rate)
    assert got.ttft_p50_s is None and got.itl_p50_s is None


def test_a_restarted_frontend_counts_from_zero() -> None:
    got = frontend_interval(parse_frontend_metrics(AFTER), parse_frontend_metrics(BEFORE), 5.0)
    assert got.requests == 11 + 4 - 7  # counters went down: the new values are the whole interval
    assert got.isl == pytest.approx(1_000)


def test_other_models_are_filtered_out() -> None:
    other = AFTER.replace('model="m"', 'model="x"')
    snap = parse_frontend_metrics(BEFORE + other, model="m")
    assert snap.requests_served == 10 and snap.isl.count == 10


def test_empty_text_is_an_empty_snapshot() -> None:
    snap = parse_frontend_metrics("")
    got = frontend_interval(snap, snap, 1.0)
    assert got.requests == 0 and got.ttft_p50_s is None


def test_quantile_of_the_first_bucket_interpolates_from_zero() -> None:
    h = HistogramSample(((1.0, 4.0), (2.0, 4.0), (math.inf, 4.0)), 2.0, 4.0)
    assert h.quantile(0.5) == pytest.approx(0.5)
    assert HistogramSample().quantile(0.5) is None


def fpm(worker: str, prefill: int, decode: int, seqs: int, step: float, kv: float) -> ForwardPassMetrics:
    return ForwardPassMetrics(worker, prefill, decode, seqs, step, kv)


def test_forward_pass_aggregation_per_interval() -> None:
    agg = ForwardPassAggregator()
    agg.add(fpm("a", 100, 0, 1, 0.02, 0.1))
    agg.add(fpm("a", 0, 4, 4, 0.01, 0.3))
    agg.add(fpm("b", 0, 2, 2, 0.03, 0.2))
    agg.add(fpm("b", 0, 2, 2, math.nan, 0.2))  # a broken step is skipped
    s = agg.take()
    assert (s.steps, s.workers, s.prefill_tokens, s.decode_tokens, s.max_num_seqs) == (3, 2, 100, 6, 4)
    assert s.busy_seconds == pytest.approx(0.06)
    assert s.mean_step_s == pytest.approx(0.02)
    assert s.mean_kv_usage == pytest.approx(0.2)
    assert s.max_kv_usage == pytest.approx(0.3)
    assert agg.take().steps == 0  # taken: the next interval starts empty


def test_an_unobserved_interval_is_all_nan_for_the_core() -> None:
    core = IntervalObservation(None).core()
    assert all(math.isnan(v) for v in (core.request_rate, core.isl, core.osl, core.prefix_hit_rate))
    fields = IntervalObservation(None).log_fields()
    assert fields["steps"] == 0 and fields["mean_step_s"] is None
