"""The planner in the loop: what one adjustment interval observed, and the production planner's
decision on it (`planner.core.Planner.step`).

The observation is what the frontend sees over the interval, as the live planner will read it:
request rate and mean ISL of the arrivals, mean OSL of the completions, prefix hit rate of the
requests that got their first token (cached / prompt tokens), and the median TTFT and ITL of the
first tokens and token gaps the interval saw. An interval with no such sample reports NaN / None,
which the planner treats as no evidence (never a crash).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from lightspeed.planner.arithmetic import Budget, EngineLimits, Observation, SlaTarget
from lightspeed.planner.core import Decision, Planner, PlannerConfig, PlannerMode
from lightspeed.protocol import PerfModel
from lightspeed.sim.config import PlannerSettings


@dataclass(slots=True)
class IntervalStats:
    arrivals: int = 0
    isl_sum: int = 0
    completions: int = 0
    osl_sum: int = 0
    cached_tokens: int = 0
    prompt_tokens: int = 0
    ttfts: list[float] = field(default_factory=list)
    itls: list[float] = field(default_factory=list)

    def observation(self, interval_s: float) -> Observation:
        nan = math.nan
        return Observation(
            request_rate=self.arrivals / interval_s,
            isl=self.isl_sum / self.arrivals if self.arrivals else nan,
            osl=self.osl_sum / self.completions if self.completions else nan,
            prefix_hit_rate=self.cached_tokens / self.prompt_tokens if self.prompt_tokens else nan,
            ttft_p50_s=statistics.median(self.ttfts) if self.ttfts else None,
            itl_p50_s=statistics.median(self.itls) if self.itls else None,
        )


class PlannerLoop:
    """Collects the interval's samples and asks the planner for the next fleet size."""

    def __init__(self, settings: PlannerSettings, perf: PerfModel, limits: EngineLimits, current: int) -> None:
        mode: PlannerMode = "load" if settings.mode == "load" else "throughput"
        cfg = PlannerConfig(
            sla=SlaTarget(settings.ttft_slo_s, settings.itl_slo_s),
            budget=Budget(settings.max_workers, settings.min_workers),
            limits=limits,
            mode=mode,
            predictor=settings.predictor,
            target_utilization=settings.target_utilization,
        )
        self.interval_s = settings.adjustment_interval_s
        self.planner = Planner(cfg, perf, current)
        self.stats = IntervalStats()
        self.decisions: list[Decision] = []

    def tick(self, current: int) -> int:
        """End of an interval: the planner's replica count for the next one."""
        self.planner.current = current  # the fleet may differ from the last decision (drains)
        decision = self.planner.step(self.stats.observation(self.interval_s))
        self.decisions.append(decision)
        self.stats = IntervalStats()
        return decision.replicas
