"""The planner's own Prometheus /metrics: what it observed, forecast and decided.

One registry per planner so several can live in one test process. Observations are one gauge
family labelled by field (request_rate, isl, ..., mean_step_s); a field that was not observed
in the last interval (no traffic, a failed scrape) reads NaN, so a dashboard shows the gap
instead of a stale number.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from lightspeed.planner.connectors import ScaleResult
from lightspeed.planner.core import Decision

P = "lightspeed_planner_"


class PlannerMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.observed = Gauge(P + "observed", "Last interval's observation, by field", ["field"], registry=r)
        self.forecast = Gauge(P + "forecast", "Forecast for the next interval, by field", ["field"], registry=r)
        self.decided = Gauge(P + "decided_replicas", "Replicas of the last decision, by pool", ["pool"], registry=r)
        self.current = Gauge(P + "current_replicas", "Replicas the connector reports running", registry=r)
        self.decisions = Counter(P + "decisions", "Decisions made", registry=r)
        self.failed = Counter(P + "scale_failures", "Decisions the connector could not apply", registry=r)
        self.interval = Gauge(P + "interval", "Number of the last interval", registry=r)

    def record(
        self, observed: Mapping[str, float | int | None], decision: Decision, result: ScaleResult | None
    ) -> None:
        for name, value in observed.items():
            self.observed.labels(name).set(math.nan if value is None else value)
        if decision.forecast is not None:
            f = decision.forecast
            for name, value in (("request_rate", f.request_rate), ("isl", f.isl), ("osl", f.osl)):
                self.forecast.labels(name).set(value)
        self.decided.labels("aggregated").set(decision.replicas)
        for pool, value in (("prefill", decision.prefill), ("decode", decision.decode)):
            if value is not None:
                self.decided.labels(pool).set(value)
        if result is not None:
            self.current.set(result.replicas)
            if not result.acted:
                self.failed.inc()
        self.decisions.inc()
        self.interval.set(decision.interval)

    def render(self) -> bytes:
        return generate_latest(self.registry)


async def serve_metrics(metrics: PlannerMetrics, host: str, port: int) -> web.AppRunner:
    """Serve GET /metrics on host:port; the caller cleans the runner up."""

    async def handler(_: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
