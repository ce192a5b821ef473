"""Observers of the planner: what the fleet did over the last adjustment interval.

Two sources (DESIGN §7):

* the frontend's Prometheus `/metrics` (frontend/metrics.py): counters and histograms are
  cumulative since the frontend started, so each interval is the *difference* of two scrapes,
  never a lifetime average. The request rate is the *arrival* rate, the demand: requests that
  ended in the interval (served, or refused by the server with a 5xx) plus the change in the
  requests in flight. Counting completions alone would cap the observed rate at what the fleet
  managed to serve, so an under-provisioned fleet would never look busy enough to grow. ISL /
  OSL means, the prefix hit rate (cached / prompt tokens) and the TTFT / ITL quantiles
  (interpolated inside histogram buckets, as Prometheus' `histogram_quantile` does) come from
  the same deltas; they are recorded when a request ends, so they describe the requests that
  finished in the interval.
* the workers' per-step `ForwardPassMetrics` on the event plane, summed per interval.

Nothing here raises on missing or odd metrics: an interval with no requests has NaN means and
no latencies, which the planner core turns into "scale to the minimum".
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from lightspeed.planner.arithmetic import Observation
from lightspeed.protocol import ForwardPassMetrics

PREFIX = "lightspeed_frontend_"
REQUESTS = PREFIX + "requests"
TTFT = PREFIX + "time_to_first_token_seconds"
ITL = PREFIX + "inter_token_latency_seconds"
ISL = PREFIX + "input_sequence_tokens"
OSL = PREFIX + "output_sequence_tokens"
CACHED = PREFIX + "cached_tokens"
INFLIGHT = PREFIX + "inflight_requests"
NAN = math.nan


@dataclass(frozen=True)
class HistogramSample:
    """A cumulative Prometheus histogram: (upper bound, cumulative count) pairs, +Inf last."""

    buckets: tuple[tuple[float, float], ...] = ()
    total: float = 0.0  # _sum
    count: float = 0.0  # _count

    def minus(self, prev: HistogramSample) -> HistogramSample:
        """This sample less an earlier one; a reset (count went down) keeps this one whole."""
        if self.count < prev.count or len(prev.buckets) != len(self.buckets):
            return self
        old = dict(prev.buckets)
        buckets = tuple((le, max(0.0, n - old.get(le, 0.0))) for le, n in self.buckets)
        return HistogramSample(buckets, self.total - prev.total, self.count - prev.count)

    def mean(self) -> float:
        return self.total / self.count if self.count > 0 else NAN

    def quantile(self, q: float) -> float | None:
        """The q-quantile, linear inside its bucket; None without observations. A quantile in
        the +Inf bucket answers the largest finite bound (what Prometheus does)."""
        if not self.buckets or self.count <= 0:
            return None
        rank = q * self.buckets[-1][1]
        lower, below = 0.0, 0.0
        for le, cum in self.buckets:
            if cum >= rank and cum > below:
                if math.isinf(le):
                    return lower
                return lower + (le - lower) * (rank - below) / (cum - below)
            lower, below = le, cum
        return lower


@dataclass(frozen=True)
class FrontendSnapshot:
    """One scrape of the frontend's cumulative metrics (all models, or one)."""

    requests_served: float = 0.0  # status "success"
    requests_refused: float = 0.0  # 5xx: demand the fleet could not take
    ttft: HistogramSample = HistogramSample()
    itl: HistogramSample = HistogramSample()
    isl: HistogramSample = HistogramSample()
    osl: HistogramSample = HistogramSample()
    cached_tokens: float = 0.0
    inflight: float = 0.0  # a gauge: requests in flight at the scrape


@dataclass(frozen=True)
class FrontendInterval:
    """The difference of two scrapes `seconds` apart."""

    seconds: float
    requests: float  # arrivals: ended (served + refused) + change in flight
    refused: float
    request_rate: float  # arrivals per second
    isl: float
    osl: float
    prefix_hit_rate: float
    ttft_p50_s: float | None
    ttft_p90_s: float | None
    itl_p50_s: float | None
    itl_p90_s: float | None


def _counter_delta(cur: float, prev: float) -> float:
    return cur - prev if cur >= prev else cur  # a restarted frontend counts from zero again


def parse_frontend_metrics(text: str, model: str | None = None) -> FrontendSnapshot:
    """The planner's view of a frontend's /metrics text; series of other models are skipped
    when `model` is given. Unknown metrics are ignored; a malformed text raises ValueError."""
    counters: dict[str, float] = {}
    hists: dict[str, dict[str, dict[float, float] | float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if model is not None and s.labels.get("model", model) != model:
                continue
            _collect(s.name, s.labels, s.value, counters, hists)
    return FrontendSnapshot(
        requests_served=counters.get("served", 0.0),
        requests_refused=counters.get("refused", 0.0),
        ttft=_histogram(hists.get(TTFT)),
        itl=_histogram(hists.get(ITL)),
        isl=_histogram(hists.get(ISL)),
        osl=_histogram(hists.get(OSL)),
        cached_tokens=counters.get("cached", 0.0),
        inflight=counters.get("inflight", 0.0),
    )


def _collect(
    name: str,
    labels: dict[str, str],
    value: float,
    counters: dict[str, float],
    hists: dict[str, dict[str, dict[float, float] | float]],
) -> None:
    if name == REQUESTS + "_total":
        status = labels.get("status", "")
        key = "served" if status == "success" else "refused" if status.startswith("5") else ""
        if key:
            counters[key] = counters.get(key, 0.0) + value
    elif name == CACHED + "_total":
        counters["cached"] = counters.get("cached", 0.0) + value
    elif name == INFLIGHT:
        counters["inflight"] = counters.get("inflight", 0.0) + value
    for base in (TTFT, ITL, ISL, OSL):
        if not name.startswith(base + "_"):
            continue
        h = hists.setdefault(base, {"buckets": {}, "sum": 0.0, "count": 0.0})
        suffix = name[len(base) + 1 :]
        if suffix == "bucket":
            buckets = h["buckets"]
            assert isinstance(buckets, dict)
            le = float(labels["le"])
            buckets[le] = buckets.get(le, 0.0) + value  # summed over models
        elif suffix in ("sum", "count"):
            old = h[suffix]
            assert isinstance(old, float)
            h[suffix] = old + value


def _histogram(h: dict[str, dict[float, float] | float] | None) -> HistogramSample:
    if h is None:
        return HistogramSample()
    buckets, total, count = h["buckets"], h["sum"], h["count"]
    assert isinstance(buckets, dict) and isinstance(total, float) and isinstance(count, float)
    return HistogramSample(tuple(sorted(buckets.items())), total, count)


def frontend_interval(prev: FrontendSnapshot, cur: FrontendSnapshot, seconds: float) -> FrontendInterval:
    """What happened between two scrapes: rates and means of the deltas, quantiles of the
    bucket deltas. NaN means / None quantiles where nothing was observed."""
    served = _counter_delta(cur.requests_served, prev.requests_served)
    refused = _counter_delta(cur.requests_refused, prev.requests_refused)
    isl, osl = cur.isl.minus(prev.isl), cur.osl.minus(prev.osl)
    ttft, itl = cur.ttft.minus(prev.ttft), cur.itl.minus(prev.itl)
    cached = _counter_delta(cur.cached_tokens, prev.cached_tokens)
    hit = cached / isl.total if isl.total > 0 else NAN
    arrivals = max(0.0, served + refused + cur.inflight - prev.inflight)
    rate = arrivals / seconds if seconds > 0 else NAN
    return FrontendInterval(
        seconds=seconds,
        requests=arrivals,
        refused=refused,
        request_rate=rate,
        isl=isl.mean(),
        osl=osl.mean(),
        prefix_hit_rate=min(max(hit, 0.0), 1.0) if math.isfinite(hit) else NAN,
        ttft_p50_s=ttft.quantile(0.5),
        ttft_p90_s=ttft.quantile(0.9),
        itl_p50_s=itl.quantile(0.5),
        itl_p90_s=itl.quantile(0.9),
    )


# ------------------------------------------------------------------ forward-pass metrics


@dataclass(frozen=True)
class ForwardPassSummary:
    """The workers' engine steps over one interval."""

    steps: int = 0
    workers: int = 0  # distinct workers that stepped
    prefill_tokens: int = 0
    decode_tokens: int = 0
    busy_seconds: float = 0.0  # summed step time over all workers
    mean_step_s: float = NAN
    mean_kv_usage: float = NAN  # step-weighted
    max_kv_usage: float = NAN
    max_num_seqs: int = 0  # largest batch seen


@dataclass
class ForwardPassAggregator:
    """Sums every `ForwardPassMetrics` received since the last `take()`."""

    _steps: list[ForwardPassMetrics] = field(default_factory=list)

    def add(self, m: ForwardPassMetrics) -> None:
        self._steps.append(m)

    def take(self) -> ForwardPassSummary:
        steps, self._steps = self._steps, []
        return summarize_steps(steps)


def summarize_steps(steps: Sequence[ForwardPassMetrics]) -> ForwardPassSummary:
    good = [s for s in steps if math.isfinite(s.step_seconds) and math.isfinite(s.kv_usage)]
    if not good:
        return ForwardPassSummary()
    busy = math.fsum(s.step_seconds for s in good)
    return ForwardPassSummary(
        steps=len(good),
        workers=len({s.worker_id for s in good}),
        prefill_tokens=sum(s.num_prefill_tokens for s in good),
        decode_tokens=sum(s.num_decode_tokens for s in good),
        busy_seconds=busy,
        mean_step_s=busy / len(good),
        mean_kv_usage=math.fsum(s.kv_usage for s in good) / len(good),
        max_kv_usage=max(s.kv_usage for s in good),
        max_num_seqs=max(s.num_seqs for s in good),
    )


# ------------------------------------------------------------------ one interval, both sources


@dataclass(frozen=True)
class IntervalObservation:
    """Everything observed in one interval; `core()` is what the pure planner consumes."""

    frontend: FrontendInterval | None  # None: the scrape failed or this is the first one
    steps: ForwardPassSummary = ForwardPassSummary()

    def core(self) -> Observation:
        f = self.frontend
        if f is None:  # no evidence at all: NaN everywhere sends the planner to the minimum
            return Observation(NAN, NAN, NAN, NAN)
        return Observation(f.request_rate, f.isl, f.osl, f.prefix_hit_rate, f.ttft_p50_s, f.itl_p50_s)

    def log_fields(self) -> dict[str, float | int | None]:
        """Flat, JSON-safe (NaN -> null) fields for the decision log and /metrics."""
        out: dict[str, float | int | None] = {}
        if self.frontend is not None:
            f = self.frontend
            out |= {
                "requests": f.requests,
                "refused": f.refused,
                "ttft_p90_s": f.ttft_p90_s,
                "itl_p90_s": f.itl_p90_s,
            }
        s = self.steps
        out |= {
            "steps": s.steps,
            "stepping_workers": s.workers,
            "prefill_tokens": s.prefill_tokens,
            "decode_tokens": s.decode_tokens,
            "busy_seconds": s.busy_seconds,
            "mean_step_s": s.mean_step_s,
            "mean_kv_usage": s.mean_kv_usage,
            "max_kv_usage": s.max_kv_usage,
        }
        return {k: _finite_or_none(v) for k, v in out.items()}


def _finite_or_none(v: float | int | None) -> float | int | None:
    if v is None or isinstance(v, int):
        return v
    return v if math.isfinite(v) else None


def finite_values(values: Iterable[float | None]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]
