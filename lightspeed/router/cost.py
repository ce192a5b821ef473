"""Per-worker routing costs and the choice among them. Pure arithmetic: no I/O, no state.

Two cost policies:
  blocks   Dynamo's cost (DESIGN §4): overlap_score_weight * prefill_blocks + decode_blocks,
           in units of KV blocks.
  latency  ours: the predicted time to first token on that worker, in seconds, following how the
           engine schedules (first come, first served chunked prefill): the prefill work still
           queued there (what was routed to it minus what it has probably done since it last
           showed prefill progress) plus this request's uncached tokens, cut into steps of the
           worker's token budget less one token per decoding request, and timed with the step
           model its card publishes (`PerfModel`). Every step before the one that ends this
           request's prefill also pays a decode phase (at the worker's projected KV usage) when
           anything on the worker decodes; the first token leaves when the prefill phase ends,
           so the last step pays none. A worker that would run out of KV blocks pays for
           recomputing what preemption throws away.
Lowest cost wins; temperature > 0 samples from a softmax of the normalised costs instead.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from lightspeed.protocol import DEFAULT_PERF_MODEL, PerfModel

COST_POLICIES = ("blocks", "latency")


@dataclass(frozen=True, slots=True)
class KvCostConfig:
    overlap_score_weight: float = 1.0
    temperature: float = 0.0
    policy: str = "blocks"

    def __post_init__(self) -> None:
        if self.overlap_score_weight < 0:
            raise ValueError(f"overlap_score_weight must be >= 0, got {self.overlap_score_weight}")
        if self.temperature < 0:
            raise ValueError(f"router temperature must be >= 0, got {self.temperature}")
        if self.policy not in COST_POLICIES:
            raise ValueError(f"cost policy must be one of {', '.join(COST_POLICIES)}; got {self.policy!r}")


@dataclass(slots=True)  # not frozen: built for every worker on every request, so init must be cheap
class Candidate:
    """One worker's situation if it took the request."""

    worker_id: str
    overlap_blocks: int  # consecutive prefix blocks already cached there
    new_prefill_tokens: int  # this request's uncached tokens there
    active_prefill_tokens: int  # prefill already queued there
    decode_blocks: int  # active unique blocks + this request's blocks not yet active there
    total_blocks: int
    max_batched_tokens: int
    block_size: int
    perf: PerfModel | None = None
    prefill_elapsed_s: float = 0.0  # since the worker last showed prefill progress
    prefill_requests: int = 0  # requests there still waiting for their first token
    decoding_requests: int = 0  # requests there past their first token


def block_cost(c: Candidate, overlap_score_weight: float) -> float:
    prefill_blocks = (c.active_prefill_tokens + c.new_prefill_tokens) / c.block_size
    return overlap_score_weight * prefill_blocks + c.decode_blocks


def latency_cost(c: Candidate, default_perf: PerfModel = DEFAULT_PERF_MODEL) -> float:
    """Predicted seconds to this request's first token on `c` (see the module docstring)."""
    perf = c.perf or default_perf
    # Each decoding request takes one token of every step's budget.
    chunk = max(1, c.max_batched_tokens - c.decoding_requests)
    usage = min(1.0, c.decode_blocks / max(1, c.total_blocks))
    decodes = c.decoding_requests + c.prefill_requests > 0
    queued = c.active_prefill_tokens - _prefilled_since(c, perf, chunk, usage, decodes)
    work = queued + c.new_prefill_tokens
    work += max(0, c.decode_blocks - c.total_blocks) * c.block_size  # recomputed after preemption
    full, rest = divmod(work, chunk)
    steps = full + (1 if rest else 0)
    ms = full * perf.prefill_ms(chunk) + perf.prefill_ms(rest)
    if decodes:
        ms += max(0, steps - 1) * perf.decode_ms(usage)
    return perf.wall_seconds(ms)


def _prefilled_since(c: Candidate, perf: PerfModel, chunk: int, usage: float, decodes: bool) -> int:
    """Queued prefill tokens the worker has probably computed since it last showed progress:
    full-budget steps for the time elapsed, never the whole queue (its first token is not in)."""
    if c.active_prefill_tokens <= 0 or c.prefill_elapsed_s <= 0:
        return 0
    step_ms = perf.step_ms(chunk, usage, decodes)
    elapsed_ms = c.prefill_elapsed_s * 1000.0 * perf.speedup_ratio
    return min(c.active_prefill_tokens - 1, int(elapsed_ms / step_ms * chunk))


def choose(costs: Sequence[tuple[str, float]], temperature: float, rng: random.Random) -> str:
    """Argmin with a random tie-break, or a softmax sample of -cost/(max-min)/temperature."""
    if not costs:
        raise ValueError("no candidates to choose from")
    lo = min(cost for _, cost in costs)
    if temperature <= 0:
        tied = [w for w, cost in costs if cost == lo]
        return tied[0] if len(tied) == 1 else rng.choice(tied)
    weights = softmax_weights([cost for _, cost in costs], temperature)
    return rng.choices([w for w, _ in costs], weights=weights, k=1)[0]


def softmax_weights(costs: Sequence[float], temperature: float) -> list[float]:
    """Probabilities of each cost under the router's temperature sampling."""
    lo, hi = min(costs), max(costs)
    span = hi - lo
    if span <= 0:
        return [1.0 / len(costs)] * len(costs)
    logits = [-(cost - lo) / span / temperature for cost in costs]
    top = max(logits)
    exps = [math.exp(x - top) for x in logits]
    total = sum(exps)
    return [x / total for x in exps]
