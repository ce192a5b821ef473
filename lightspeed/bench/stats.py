"""Aggregation of per-request results into latency distributions and throughput.

Percentiles use linear interpolation between closest ranks (numpy's default), so figures can
be cross-checked with numpy or pandas on the raw per-request dump.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence

import msgspec

from lightspeed.bench.client import RequestResult


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """q-th percentile (0..100) of an ascending, non-empty sequence, linearly interpolated."""
    if not sorted_values:
        raise ValueError("percentile of an empty sequence")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"q must be in [0, 100]; got {q}")
    rank = q / 100.0 * (len(sorted_values) - 1)
    lo = math.floor(rank)
    hi = min(lo + 1, len(sorted_values) - 1)
    frac = rank - lo
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * frac


class Distribution(msgspec.Struct):
    count: int
    mean: float
    min: float
    p50: float
    p90: float
    p99: float
    max: float


def distribution(values: Iterable[float]) -> Distribution | None:
    """Summary of a sample; None when it is empty (e.g. ITL when every output is 1 token)."""
    ordered = sorted(values)
    if not ordered:
        return None
    return Distribution(
        count=len(ordered),
        mean=math.fsum(ordered) / len(ordered),
        min=ordered[0],
        p50=percentile(ordered, 50),
        p90=percentile(ordered, 90),
        p99=percentile(ordered, 99),
        max=ordered[-1],
    )


class BenchSummary(msgspec.Struct):
    duration_s: float
    requests: int
    completed: int
    failed: int
    req_per_s: float
    output_tok_per_s: float
    input_tok_per_s: float
    total_output_tokens: int
    total_prompt_tokens: int
    total_cached_tokens: int
    prefix_cache_hit_rate: float | None  # cached / prompt tokens, None if nothing reported
    ttft_s: Distribution | None
    itl_s: Distribution | None  # gaps between consecutive token chunks, all requests pooled
    tpot_s: Distribution | None  # per request: (e2e - ttft) / (output_tokens - 1)
    e2e_s: Distribution | None
    failures: dict[str, int]  # reason -> count
    error_samples: dict[str, str]  # reason -> first detail seen, to diagnose without a log


def _tpot(result: RequestResult) -> float | None:
    if result.ttft_s is None or result.output_tokens < 2:
        return None
    return (result.e2e_s - result.ttft_s) / (result.output_tokens - 1)


def _failures(results: Sequence[RequestResult]) -> tuple[dict[str, int], dict[str, str]]:
    counts = Counter(r.error for r in results if r.error is not None)
    samples: dict[str, str] = {}
    for r in results:
        if r.error is not None and r.error not in samples:
            samples[r.error] = r.error_detail or ""
    return dict(sorted(counts.items())), samples


def summarize(results: Sequence[RequestResult], duration_s: float) -> BenchSummary:
    """Aggregate a measured phase that took `duration_s` of wall time."""
    if duration_s <= 0:
        raise ValueError(f"duration_s must be > 0; got {duration_s}")
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    prompt_tokens = sum(r.prompt_tokens or 0 for r in ok)
    cached_known = [r for r in ok if r.cached_tokens is not None and r.prompt_tokens]
    cached = sum(r.cached_tokens or 0 for r in cached_known)
    cached_base = sum(r.prompt_tokens or 0 for r in cached_known)
    failures, samples = _failures(results)
    return BenchSummary(
        duration_s=duration_s,
        requests=len(results),
        completed=len(ok),
        failed=len(results) - len(ok),
        req_per_s=len(ok) / duration_s,
        output_tok_per_s=out_tokens / duration_s,
        input_tok_per_s=prompt_tokens / duration_s,
        total_output_tokens=out_tokens,
        total_prompt_tokens=prompt_tokens,
        total_cached_tokens=cached,
        prefix_cache_hit_rate=cached / cached_base if cached_base else None,
        ttft_s=distribution(r.ttft_s for r in ok if r.ttft_s is not None),
        itl_s=distribution(itl for r in ok for itl in r.itls_s),
        tpot_s=distribution(t for t in map(_tpot, ok) if t is not None),
        e2e_s=distribution(r.e2e_s for r in ok),
        failures=failures,
        error_samples=samples,
    )


class TimeSeries(msgspec.Struct):
    """Per-bucket load over the run: completions and output tokens by completion time, mean
    TTFT of the requests that started in the bucket (NaN-free: 0.0 when none started)."""

    bucket_s: float
    t_s: list[float]
    completed_per_s: list[float]
    output_tok_per_s: list[float]
    mean_ttft_s: list[float]
    failed_per_s: list[float]


def time_series(results: Sequence[RequestResult], bucket_s: float = 1.0) -> TimeSeries:
    if bucket_s <= 0:
        raise ValueError(f"bucket_s must be > 0; got {bucket_s}")
    end = max((r.start_s + r.e2e_s for r in results), default=0.0)
    n = max(1, math.ceil(end / bucket_s))
    done, tokens, failed = [0.0] * n, [0.0] * n, [0.0] * n
    ttft_sum, ttft_n = [0.0] * n, [0] * n
    for r in results:
        b_end = min(n - 1, max(0, int((r.start_s + r.e2e_s) / bucket_s)))
        if not r.ok:
            failed[b_end] += 1 / bucket_s
            continue
        done[b_end] += 1 / bucket_s
        tokens[b_end] += r.output_tokens / bucket_s
        if r.ttft_s is not None:
            b_start = min(n - 1, max(0, int(r.start_s / bucket_s)))
            ttft_sum[b_start] += r.ttft_s
            ttft_n[b_start] += 1
    mean_ttft = [s / c if c else 0.0 for s, c in zip(ttft_sum, ttft_n, strict=True)]
    starts = [i * bucket_s for i in range(n)]
    return TimeSeries(bucket_s, starts, done, tokens, mean_ttft, failed)
