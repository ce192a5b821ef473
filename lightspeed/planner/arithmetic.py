"""Replica arithmetic of the SLA planner (DESIGN §7): pure functions, no I/O.

Throughput mode sizes each pool from a forecast `Observation` and the fitted step-time model
(`PerfModel`):

* prefill: effective_isl = isl * (1 - min(hit, 0.95)); one prefill takes
  wt = wall_seconds(prefill_ms(ceil(effective_isl))); engine_rps = 1 / wt;
  replicas = ceil(demand_rps / engine_rps).
* decode: at context = isl + osl / 2 tokens a batch of bs sequences uses p = context * bs / kv
  capacity tokens of the KV cache; bs is the largest batch (1..max_num_seqs, and p <= 1) whose
  step time wall_seconds(decode_ms(p)) meets the ITL target; engine_rps = bs / (osl * step);
  replicas = ceil(demand_rps / engine_rps).
* aggregated (one pool doing both phases, time-shared):
  replicas = ceil(demand * (wt + osl * step / bs) / utilization); see `aggregated_replicas`.
* `utilization` (default 1) divides every demand: headroom for queueing inside an interval.

Every count is clamped to a `Budget` (max workers, min workers >= 1). No traffic, or a
forecast with NaN / inf where a number is needed, sizes the pool to the budget's minimum: the
planner never raises or freezes on bad metrics. Configuration (`SlaTarget`, `Budget`,
`EngineLimits`, the load-mode watermark) is validated with ValueError.

Load mode (`load_step`) ignores the model: one worker more when the observed latency is over the
SLA, one fewer when it is well under.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lightspeed.protocol import PerfModel

MAX_PREFIX_HIT = 0.95  # cap on the prefix hit rate credited to prefill (DESIGN §7)
_CEIL_SLACK = 1e-9  # ceil(2.0000000001) from float noise must stay 2
_MAX_COUNT = 1e12  # a raw count beyond any budget (keeps ceil() of huge ratios cheap)


def _usable(x: float | None) -> bool:
    """A finite, strictly positive number."""
    return x is not None and math.isfinite(x) and x > 0


def _positive(name: str, x: float) -> float:
    if not _usable(x):
        raise ValueError(f"{name} must be a finite number > 0, got {x!r}")
    return float(x)


def _int_at_least(name: str, x: int, low: int) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {x!r}")
    return x


@dataclass(frozen=True)
class Observation:
    """One interval's traffic (observed or forecast). Values may be NaN: nothing here raises."""

    request_rate: float  # requests per second
    isl: float  # mean input sequence length, tokens
    osl: float  # mean output sequence length, tokens
    prefix_hit_rate: float = 0.0  # fraction of input tokens served from the prefix cache
    ttft_p50_s: float | None = None  # observed time to first token, median, seconds
    itl_p50_s: float | None = None  # observed inter-token latency, median, seconds


@dataclass(frozen=True)
class SlaTarget:
    """Latency targets, seconds."""

    ttft_s: float
    itl_s: float

    def __post_init__(self) -> None:
        _positive("ttft_s", self.ttft_s)
        _positive("itl_s", self.itl_s)


@dataclass(frozen=True)
class Budget:
    """Worker count bounds of one pool: min_workers <= replicas <= max_workers, min >= 1."""

    max_workers: int
    min_workers: int = 1

    def __post_init__(self) -> None:
        _int_at_least("min_workers", self.min_workers, 1)
        _int_at_least("max_workers", self.max_workers, self.min_workers)


@dataclass(frozen=True)
class EngineLimits:
    """What one decode engine holds: KV cache capacity in tokens and its batch limit."""

    kv_capacity_tokens: int
    max_num_seqs: int = 256

    def __post_init__(self) -> None:
        _int_at_least("kv_capacity_tokens", self.kv_capacity_tokens, 1)
        _int_at_least("max_num_seqs", self.max_num_seqs, 1)


@dataclass(frozen=True)
class ReplicaPlan:
    """Clamped replica counts of each pool (disaggregated) and of a single aggregated pool."""

    prefill: int
    decode: int
    aggregated: int


def clamp_replicas(raw: int, budget: Budget) -> int:
    """`raw` bounded to [budget.min_workers, budget.max_workers]."""
    return max(budget.min_workers, min(budget.max_workers, raw))


def _ceil_count(x: float) -> int:
    """ceil(x) for a replica count, tolerant of float noise; 0 for x <= 0 or NaN."""
    if not x > 0:
        return 0
    return math.ceil(min(x, _MAX_COUNT) - _CEIL_SLACK)


def effective_isl(isl: float, prefix_hit_rate: float) -> float:
    """Uncached input tokens: isl * (1 - min(hit, 0.95)); a NaN hit rate counts as no hits."""
    hit = prefix_hit_rate if math.isfinite(prefix_hit_rate) else 0.0
    hit = min(max(hit, 0.0), MAX_PREFIX_HIT)
    return max(isl, 0.0) * (1.0 - hit)


def prefill_wall_seconds(model: PerfModel, isl: float, prefix_hit_rate: float) -> float:
    """Wall seconds of one request's prefill (uncached tokens rounded up to whole tokens)."""
    if not math.isfinite(isl):
        return math.nan
    tokens = math.ceil(effective_isl(isl, prefix_hit_rate))
    return model.wall_seconds(model.prefill_ms(tokens))


def prefill_replicas(demand_rps: float, isl: float, prefix_hit_rate: float, model: PerfModel) -> int:
    """Unclamped prefill workers: ceil(demand / engine_rps), engine_rps = 1 / prefill wall time.

    Equivalently ceil(demand * wt). 0 when there is no traffic or a needed value is not usable.
    """
    if not _usable(demand_rps):
        return 0
    wt = prefill_wall_seconds(model, isl, prefix_hit_rate)
    if not _usable(wt):
        return 0
    return _ceil_count(demand_rps * wt)


def decode_usage(context_tokens: float, batch: int, kv_capacity_tokens: int) -> float:
    """KV cache usage of `batch` sequences of `context_tokens` each: context * batch / capacity."""
    return context_tokens * batch / kv_capacity_tokens


def decode_batch(model: PerfModel, context_tokens: float, itl_s: float, limits: EngineLimits) -> tuple[int, float]:
    """Largest batch whose decode step meets `itl_s`, and that step's wall seconds.

    Batches run from 1 to max_num_seqs and stop where the KV cache would overflow (p > 1; at
    least 1). Every size is checked, so a model whose decode time is not monotone in p is fine.
    When even a batch of 1 misses the target no worker count meets the SLA; the answer is then
    (1, its step time), the batch that asks for the most workers (the budget caps them).
    """
    fit = int(limits.kv_capacity_tokens // context_tokens) if context_tokens > 0 else limits.max_num_seqs
    top = max(1, min(limits.max_num_seqs, fit))
    best = 1
    for bs in range(1, top + 1):
        step = model.wall_seconds(model.decode_ms(decode_usage(context_tokens, bs, limits.kv_capacity_tokens)))
        if step <= itl_s:
            best = bs
    step = model.wall_seconds(model.decode_ms(decode_usage(context_tokens, best, limits.kv_capacity_tokens)))
    return best, step


def decode_seconds(isl: float, osl: float, itl_s: float, model: PerfModel, limits: EngineLimits) -> float:
    """A request's share of a decode engine's time: osl * step / bs, at the largest batch meeting
    the ITL target and the mean context halfway through its output (isl + osl / 2); NaN when a
    needed value is not usable."""
    if not (_usable(osl) and _usable(itl_s) and math.isfinite(isl)):
        return math.nan
    bs, step = decode_batch(model, max(isl, 0.0) + osl / 2, itl_s, limits)
    return osl * step / bs


def decode_replicas(
    demand_rps: float, isl: float, osl: float, itl_s: float, model: PerfModel, limits: EngineLimits
) -> int:
    """Unclamped decode workers: ceil(demand / engine_rps), engine_rps = bs / (osl * step).
    0 when there is no traffic or a needed value is not usable."""
    per_request = decode_seconds(isl, osl, itl_s, model, limits)
    if not (_usable(demand_rps) and _usable(per_request)):
        return 0
    return _ceil_count(demand_rps * per_request)


def aggregated_replicas(
    obs: Observation, itl_s: float, model: PerfModel, limits: EngineLimits, utilization: float = 1.0
) -> int:
    """Unclamped workers of one pool doing both phases, time-shared: each request costs its
    prefill wall time plus its share of decode steps (osl * step / bs, the step of the largest
    batch meeting the ITL target), and a worker may be busy `utilization` of the time:
    ceil(demand * (wt_prefill + osl * step / bs) / utilization).

    Not max(prefill, decode) (Dynamo's aggregated sizing): an engine's steps run its prefill
    chunks and its decodes one after the other, so the two phases' times add up; the max sized
    fleets ~30% short on the Azure conversation trace. `utilization` < 1 leaves headroom for the
    queueing of bursts inside an interval, which the mean rate does not show.
    """
    if not (_usable(obs.request_rate) and math.isfinite(obs.isl)):
        return 0
    # Unknown output lengths (or prefill time): that phase counts as 0, as its own pool would.
    phases = (
        prefill_wall_seconds(model, obs.isl, obs.prefix_hit_rate),
        decode_seconds(obs.isl, obs.osl, itl_s, model, limits),
    )
    work = sum(t for t in phases if _usable(t))
    return _ceil_count(obs.request_rate * work / utilization)


def check_utilization(utilization: float) -> float:
    if not (math.isfinite(utilization) and 0 < utilization <= 1):
        raise ValueError(f"target utilization must be in (0, 1], got {utilization!r}")
    return utilization


def plan_replicas(
    obs: Observation,
    sla: SlaTarget,
    budget: Budget,
    model: PerfModel,
    limits: EngineLimits,
    utilization: float = 1.0,
) -> ReplicaPlan:
    """Throughput-mode counts for a forecast: prefill and decode pools (each sized for its
    phase alone, at `utilization`) and an aggregated pool (both phases time-shared)."""
    check_utilization(utilization)
    prefill = prefill_replicas(obs.request_rate / utilization, obs.isl, obs.prefix_hit_rate, model)
    decode = decode_replicas(obs.request_rate / utilization, obs.isl, obs.osl, sla.itl_s, model, limits)
    aggregated = aggregated_replicas(obs, sla.itl_s, model, limits, utilization)
    return ReplicaPlan(
        prefill=clamp_replicas(prefill, budget),
        decode=clamp_replicas(decode, budget),
        aggregated=clamp_replicas(aggregated, budget),
    )


def load_step(
    current: int,
    ttft_p50: float | None,
    itl_p50: float | None,
    sla: SlaTarget,
    low_watermark: float = 0.5,
    budget: Budget | None = None,
) -> int:
    """Load-mode change to the worker count: +1, -1 or 0, clamped.

    +1 when a known latency is over its target (ttft_p50 > ttft_s or itl_p50 > itl_s); -1 when
    every known latency is below low_watermark * its target ("well under"); 0 otherwise. A latency
    that is None or not finite gives no evidence of load, so with none known (no traffic) the
    step is -1, toward the minimum. The result keeps current + step within the budget (min 1 when
    none is given); if `current` is already outside it, the step returns it to the nearest bound.
    """
    _int_at_least("current", current, 0)
    if not (math.isfinite(low_watermark) and 0 < low_watermark < 1):
        raise ValueError(f"low_watermark must be in (0, 1), got {low_watermark!r}")
    known = [(v, t) for v, t in ((ttft_p50, sla.ttft_s), (itl_p50, sla.itl_s)) if v is not None and math.isfinite(v)]
    if any(v > t for v, t in known):
        step = 1
    elif all(v < low_watermark * t for v, t in known):
        step = -1
    else:
        step = 0
    low, high = (budget.min_workers, budget.max_workers) if budget else (1, max(current + 1, 1))
    return max(low, min(high, current + step)) - current
