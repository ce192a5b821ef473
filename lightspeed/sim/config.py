"""Configuration of one replay: the trace slice, the fleet, the planner. Validated at construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from lightspeed.bench.config import TRACE_FORMATS
from lightspeed.config import ROUTER_MODES, RouterConfig
from lightspeed.engine.config import EngineConfig
from lightspeed.planner.predictors import PREDICTORS

PLANNER_MODES = ("off", "throughput", "load")
# Every selector but `direct`, which needs a pinned worker per request (no trace names one).
REPLAY_ROUTER_MODES = tuple(m for m in ROUTER_MODES if m != "direct")


def _positive(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0; got {value!r}")


@dataclass(frozen=True, slots=True)
class TraceSlice:
    """Which requests to replay and how fast: the bench's trace options, in virtual time."""

    path: str
    fmt: str = "auto"
    speedup: float = 1.0  # trace inter-arrival times are divided by this
    start_s: float = 0.0
    window_s: float | None = None
    num_requests: int | None = None
    max_output_tokens: int | None = None
    duration_s: float | None = None  # stop sending after this many (virtual) seconds
    seed: int = 0
    vocab_size: int = 49152
    min_token_id: int = 100

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("trace must name a Mooncake JSONL or Azure CSV file")
        if self.fmt not in TRACE_FORMATS:
            raise ValueError(f"trace_format must be one of {', '.join(TRACE_FORMATS)}; got {self.fmt!r}")
        _positive("speedup", self.speedup)
        if self.start_s < 0:
            raise ValueError(f"trace_start must be >= 0; got {self.start_s}")
        for name in ("window_s", "duration_s"):
            value = getattr(self, name)
            if value is not None:
                _positive(name, value)
        for name in ("num_requests", "max_output_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1; got {value}")


@dataclass(frozen=True, slots=True)
class FleetConfig:
    """Aggregated mocker workers as `serve --engine mocker` runs them, and the router mode."""

    workers: int = 1
    engine: EngineConfig = field(default_factory=EngineConfig)
    speedup_ratio: float = 1.0
    router_mode: str = "kv"
    router: RouterConfig = field(default_factory=RouterConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"workers must be an integer >= 1; got {self.workers!r}")
        _positive("speedup_ratio", self.speedup_ratio)
        if self.router_mode not in REPLAY_ROUTER_MODES:
            raise ValueError(f"router_mode must be one of {', '.join(REPLAY_ROUTER_MODES)}; got {self.router_mode!r}")


@dataclass(frozen=True, slots=True)
class PlannerSettings:
    """The SLA (also what attainment is measured against) and, unless mode is off, the planner."""

    mode: str = "off"
    predictor: str = "constant"
    ttft_slo_s: float = 2.0
    itl_slo_s: float = 0.05
    min_workers: int = 1
    max_workers: int = 8
    adjustment_interval_s: float = 60.0
    start_delay_s: float = 30.0  # a new worker serves this long after the planner asks for it
    target_utilization: float = 1.0  # throughput mode: headroom for bursts (planner/arithmetic.py)

    def __post_init__(self) -> None:
        if self.mode not in PLANNER_MODES:
            raise ValueError(f"planner must be one of {', '.join(PLANNER_MODES)}; got {self.mode!r}")
        if self.predictor not in PREDICTORS:
            raise ValueError(f"predictor must be one of {', '.join(sorted(PREDICTORS))}; got {self.predictor!r}")
        for name in ("ttft_slo_s", "itl_slo_s", "adjustment_interval_s"):
            _positive(name, getattr(self, name))
        if not (math.isfinite(self.start_delay_s) and self.start_delay_s >= 0):
            raise ValueError(f"worker_start_delay must be >= 0; got {self.start_delay_s}")
        if not isinstance(self.min_workers, int) or self.min_workers < 1:
            raise ValueError(f"min_workers must be an integer >= 1; got {self.min_workers!r}")
        if not isinstance(self.max_workers, int) or self.max_workers < self.min_workers:
            raise ValueError(f"max_workers must be an integer >= min_workers; got {self.max_workers!r}")

    @property
    def enabled(self) -> bool:
        return self.mode != "off"


@dataclass(frozen=True, slots=True)
class ReplayConfig:
    trace: TraceSlice
    fleet: FleetConfig = field(default_factory=FleetConfig)
    planner: PlannerSettings = field(default_factory=PlannerSettings)
    label: str = ""
    progress: bool = False

    def __post_init__(self) -> None:
        if self.planner.enabled and not (self.planner.min_workers <= self.fleet.workers <= self.planner.max_workers):
            raise ValueError(
                f"workers ({self.fleet.workers}) must lie within [min_workers, max_workers] "
                f"= [{self.planner.min_workers}, {self.planner.max_workers}] when the planner is on"
            )
