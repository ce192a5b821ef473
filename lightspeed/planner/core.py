"""One planner interval, pure: observe -> predict -> compute replicas -> a typed decision.

The planner process (to come: observers on the frontend's and workers' metrics, connectors that
act) calls `Planner.step` once per adjustment interval with what it observed; everything here is
arithmetic over that, so it is tested on hand-built observations and the I/O stays outside.
Throughput mode forecasts request rate, ISL and OSL with one predictor each and sizes the pool
with DESIGN §7's arithmetic; load mode ignores forecasts and moves the current count by ±1 on the
observed latencies. Each decision serializes to one JSON line for the decision log.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import msgspec

from lightspeed.planner.arithmetic import (
    Budget,
    EngineLimits,
    Observation,
    SlaTarget,
    check_utilization,
    load_step,
    plan_replicas,
)
from lightspeed.planner.predictors import make_predictor
from lightspeed.protocol import PerfModel

PlannerMode = Literal["throughput", "load"]


@dataclass(frozen=True)
class PlannerConfig:
    sla: SlaTarget
    budget: Budget
    limits: EngineLimits
    mode: PlannerMode = "throughput"
    predictor: str = "constant"  # a name in predictors.PREDICTORS
    # Throughput mode: the busy fraction a worker is sized for (1 = none of the interval's
    # burstiness absorbed; queueing then pushes TTFT over the SLA at the forecast rate).
    target_utilization: float = 1.0

    def __post_init__(self) -> None:
        if self.mode not in ("throughput", "load"):
            raise ValueError(f"mode must be throughput or load, got {self.mode!r}")
        check_utilization(self.target_utilization)
        make_predictor(self.predictor)  # an unknown name is a configuration error, up front


class Forecast(msgspec.Struct, frozen=True):
    request_rate: float
    isl: float
    osl: float


class Decision(msgspec.Struct, frozen=True):
    """What one interval saw, expected and chose (one line of the decision log)."""

    interval: int
    mode: str
    observed: dict[str, float | None]
    forecast: Forecast | None  # throughput mode only
    prefill: int | None  # throughput mode: the disaggregated pools' counts
    decode: int | None
    replicas: int  # the aggregated pool's new size


class Planner:
    def __init__(self, cfg: PlannerConfig, model: PerfModel, current: int) -> None:
        self.cfg = cfg
        self.model = model
        self.current = current
        self.interval = 0
        self._rate = make_predictor(cfg.predictor)
        self._isl = make_predictor(cfg.predictor)
        self._osl = make_predictor(cfg.predictor)

    def step(self, obs: Observation) -> Decision:
        self.interval += 1
        decision = self._throughput(obs) if self.cfg.mode == "throughput" else self._load(obs)
        self.current = decision.replicas
        return decision

    def _throughput(self, obs: Observation) -> Decision:
        for predictor, value in ((self._rate, obs.request_rate), (self._isl, obs.isl), (self._osl, obs.osl)):
            predictor.observe(value)  # non-finite values are skipped by every predictor
        forecast = Forecast(self._rate.predict(), self._isl.predict(), self._osl.predict())
        hit = obs.prefix_hit_rate if math.isfinite(obs.prefix_hit_rate) else 0.0
        expected = Observation(forecast.request_rate, forecast.isl, forecast.osl, hit)
        plan = plan_replicas(
            expected, self.cfg.sla, self.cfg.budget, self.model, self.cfg.limits, self.cfg.target_utilization
        )
        return Decision(
            self.interval, "throughput", _observed(obs), forecast, plan.prefill, plan.decode, plan.aggregated
        )

    def _load(self, obs: Observation) -> Decision:
        change = load_step(self.current, obs.ttft_p50_s, obs.itl_p50_s, self.cfg.sla, budget=self.cfg.budget)
        return Decision(self.interval, "load", _observed(obs), None, None, None, self.current + change)


def _observed(obs: Observation) -> dict[str, float | None]:
    """The observation as the log shows it: NaN / inf become null (JSON has no NaN)."""

    def clean(v: float | None) -> float | None:
        return v if v is not None and math.isfinite(v) else None

    return {
        "request_rate": clean(obs.request_rate),
        "isl": clean(obs.isl),
        "osl": clean(obs.osl),
        "prefix_hit_rate": clean(obs.prefix_hit_rate),
        "ttft_p50_s": clean(obs.ttft_p50_s),
        "itl_p50_s": clean(obs.itl_p50_s),
    }


_encoder = msgspec.json.Encoder()


def decision_log_line(decision: Decision) -> bytes:
    return _encoder.encode(decision) + b"\n"
