import pytest

from lightspeed.bench.client import RequestResult
from lightspeed.bench.stats import distribution, percentile, summarize, time_series


def test_percentile_linear_interpolation() -> None:
    values = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 50) == 5.5
    assert percentile(values, 90) == pytest.approx(9.1)
    assert percentile(values, 99) == pytest.approx(9.91)
    assert percentile(values, 100) == 10.0
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_distribution_matches_known_values() -> None:
    d = distribution([4.0, 1.0, 3.0, 2.0, 5.0])
    assert d is not None
    assert (d.count, d.mean, d.min, d.p50, d.max) == (5, 3.0, 1.0, 3.0, 5.0)
    assert d.p90 == pytest.approx(4.6)
    assert d.p99 == pytest.approx(4.96)
    assert distribution([]) is None


def _ok(
    start: float,
    ttft: float,
    e2e: float,
    itls: list[float],
    out: int,
    prompt: int,
    cached: int | None,
) -> RequestResult:
    return RequestResult(
        start_s=start,
        e2e_s=e2e,
        ttft_s=ttft,
        itls_s=itls,
        output_tokens=out,
        prompt_tokens=prompt,
        cached_tokens=cached,
        status=200,
    )


def test_summarize_throughput_cache_and_failures() -> None:
    results = [
        _ok(0.0, 0.1, 0.4, [0.1, 0.2], 3, 100, 50),
        _ok(0.5, 0.3, 0.6, [0.3], 2, 100, 0),
        RequestResult(start_s=1.0, e2e_s=0.01, status=503, error="http_503", error_detail="busy"),
        RequestResult(start_s=1.1, e2e_s=0.01, status=503, error="http_503", error_detail="b2"),
        RequestResult(start_s=1.2, e2e_s=2.0, error="timeout", error_detail="t"),
    ]
    s = summarize(results, duration_s=2.0)
    assert (s.requests, s.completed, s.failed) == (5, 2, 3)
    assert s.req_per_s == 1.0
    assert s.output_tok_per_s == 2.5
    assert s.input_tok_per_s == 100.0
    assert (s.total_output_tokens, s.total_prompt_tokens, s.total_cached_tokens) == (5, 200, 50)
    assert s.prefix_cache_hit_rate == 0.25
    assert s.failures == {"http_503": 2, "timeout": 1}
    assert s.error_samples == {"http_503": "busy", "timeout": "t"}
    assert s.ttft_s is not None and s.ttft_s.p50 == pytest.approx(0.2)
    assert s.itl_s is not None and s.itl_s.count == 3 and s.itl_s.p50 == pytest.approx(0.2)
    assert s.tpot_s is not None
    assert sorted([s.tpot_s.min, s.tpot_s.max]) == pytest.approx([0.15, 0.3])
    assert s.e2e_s is not None and s.e2e_s.max == pytest.approx(0.6)


def test_hit_rate_none_when_server_reports_no_cache() -> None:
    s = summarize([_ok(0.0, 0.1, 0.2, [], 1, 10, None)], duration_s=1.0)
    assert s.prefix_cache_hit_rate is None
    assert s.itl_s is None
    assert s.tpot_s is None


def test_time_series_buckets() -> None:
    results = [
        _ok(0.0, 0.2, 0.5, [], 4, 10, None),  # ends in bucket 0
        _ok(0.2, 0.4, 1.5, [], 6, 10, None),  # ends in bucket 1
        RequestResult(start_s=1.0, e2e_s=0.5, error="timeout"),  # ends in bucket 1
    ]
    ts = time_series(results, bucket_s=1.0)
    assert ts.t_s == [0.0, 1.0]
    assert ts.completed_per_s == [1.0, 1.0]
    assert ts.output_tok_per_s == [4.0, 6.0]
    assert ts.failed_per_s == [0.0, 1.0]
    assert ts.mean_ttft_s == pytest.approx([0.3, 0.0])
