"""SLA attainment and the timeline, on hand-made results."""

from __future__ import annotations

import pytest

from lightspeed.bench.client import RequestResult
from lightspeed.sim.fleet import ReplicaPoint
from lightspeed.sim.report import sla_summary, timeline


def _ok(start: float, ttft: float, e2e: float, tokens: int) -> RequestResult:
    return RequestResult(start_s=start, e2e_s=e2e, ttft_s=ttft, output_tokens=tokens, status=200)


def test_sla_counts_ttft_and_mean_itl_and_failures_as_misses() -> None:
    results = [
        _ok(0.0, 1.0, 1.0 + 9 * 0.04, 10),  # within both
        _ok(0.0, 3.0, 3.0 + 9 * 0.04, 10),  # TTFT miss
        _ok(0.0, 1.0, 1.0 + 9 * 0.06, 10),  # ITL miss
        _ok(0.0, 0.5, 0.5, 1),  # one token: no ITL to miss
        RequestResult(start_s=0.0, e2e_s=0.0, status=503, error="http_503"),
    ]
    s = sla_summary(results, ttft_slo_s=2.0, itl_slo_s=0.05)
    assert (s.requests, s.within) == (5, 2)
    assert s.attainment == pytest.approx(2 / 5)
    assert s.ttft_attainment == pytest.approx(3 / 5)
    assert s.itl_attainment == pytest.approx(3 / 5)


def test_timeline_buckets_arrivals_replicas_and_ttft() -> None:
    results = [_ok(0.5, 0.1, 0.2, 2), _ok(1.5, 0.3, 0.4, 2), _ok(1.6, 0.5, 0.6, 2)]
    replicas = [ReplicaPoint(0.0, 1, 1), ReplicaPoint(1.0, 1, 2), ReplicaPoint(1.5, 2, 2)]
    tl = timeline(results, replicas, end_s=2.0, buckets=2)
    assert tl.bucket_s == 1.0
    assert tl.request_rate == [1.0, 2.0]
    assert (tl.serving, tl.provisioned) == ([1, 1], [1, 2])
    assert tl.ttft_p50_s == pytest.approx([0.1, 0.4])
