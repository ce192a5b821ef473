"""The planner loop: every adjustment interval observe -> decide (pure core) -> act -> record.

`PlannerService.step` is one interval; `run` sleeps the interval between steps (the sleep and
the clock are injected, so tests drive it with a fake clock). Before the first interval the
service takes one priming observation: counters are cumulative, so the first decision must see
a real interval, not "no scrape yet" (which would send the fleet to its minimum at start).

Nothing an interval meets stops the loop: an observer that raises counts as "nothing observed"
(NaN, so the core sizes to the minimum), a connector that fails is recorded and retried at the
next interval. Each interval appends one JSON line to the decision log (`DecisionRecord`: the
core's `Decision`, the extra observations such as p90 latencies and the forward-pass summary,
and what the connector did) and updates the planner's /metrics.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec

from lightspeed.planner.connectors import Connector, ScaleResult
from lightspeed.planner.core import Decision, Planner
from lightspeed.planner.metrics import PlannerMetrics
from lightspeed.planner.observe import IntervalObservation

log = logging.getLogger(__name__)
Observe = Callable[[], Awaitable[IntervalObservation]]


class DecisionRecord(msgspec.Struct, frozen=True):
    """One line of the decision log."""

    time: float  # unix seconds when the decision was made
    decision: Decision
    extra: dict[str, float | int | None]  # p90s, forward-pass summary (null: not observed)
    dry_run: bool
    result: ScaleResult | None  # None in a dry run


_encode = msgspec.json.Encoder().encode


class PlannerService:
    def __init__(
        self,
        planner: Planner,
        observe: Observe,
        connector: Connector,
        *,
        interval_s: float,
        dry_run: bool = False,
        decision_log: str | Path | None = None,
        metrics: PlannerMetrics | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not interval_s > 0:
            raise ValueError(f"adjustment_interval must be > 0; got {interval_s}")
        self.planner = planner
        self._observe = observe
        self.connector = connector
        self.interval_s = interval_s
        self.dry_run = dry_run
        self.decision_log = Path(decision_log) if decision_log else None
        self.metrics = metrics
        self._sleep = sleep
        self._clock = clock
        self.records: list[DecisionRecord] = []  # kept for tests and the bench (small: one per interval)

    async def prime(self) -> None:
        """The first scrape: the baseline the first interval is measured against."""
        await self._safe_observe()

    async def step(self) -> DecisionRecord:
        obs = await self._safe_observe()
        current = await self.connector.current()
        if current is not None:
            self.planner.current = current  # load mode steps from what really runs
        decision = self.planner.step(obs.core())
        result = None if self.dry_run else await self._act(decision)
        record = DecisionRecord(self._clock(), decision, obs.log_fields(), self.dry_run, result)
        self._record(record)
        return record

    async def run(self, stop: asyncio.Event) -> None:
        """Prime, then one step per interval until `stop` is set."""
        await self.prime()
        while not stop.is_set():
            await self._sleep(self.interval_s)
            if stop.is_set():
                return
            await self.step()

    async def _safe_observe(self) -> IntervalObservation:
        try:
            return await self._observe()
        except Exception:  # an observer bug must not freeze the fleet at its current size
            log.exception("planner: observation failed; treating the interval as unobserved")
            return IntervalObservation(None)

    async def _act(self, decision: Decision) -> ScaleResult:
        try:
            return await self.connector.scale(decision.replicas, decision)
        except Exception as err:
            log.exception("planner: connector %s failed", self.connector.name)
            return ScaleResult(decision.replicas, False, f"connector error: {err}")

    def _record(self, record: DecisionRecord) -> None:
        self.records.append(record)
        d = record.decision
        log.info(
            "planner interval %d: rate %s isl %s osl %s ttft_p50 %s itl_p50 %s -> %d replicas%s",
            d.interval,
            *(d.observed.get(k) for k in ("request_rate", "isl", "osl", "ttft_p50_s", "itl_p50_s")),
            d.replicas,
            " (dry run)" if record.dry_run else f" ({record.result.detail})" if record.result else "",
        )
        if self.decision_log is not None:
            with self.decision_log.open("ab") as f:
                f.write(_encode(record) + b"\n")
        if self.metrics is not None:
            self.metrics.record({**d.observed, **record.extra}, d, record.result)
