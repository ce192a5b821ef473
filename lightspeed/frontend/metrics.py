"""Prometheus metrics of the frontend (served on /metrics).

One registry per app instance so several frontends can live in one test process. Buckets are
chosen for LLM serving: TTFT from 1 ms to a minute, ITL from 100 µs to 2 s.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from lightspeed.runtime.loop_lag import LoopLagMonitor

_TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_ITL_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2)
_LEN_BUCKETS = (16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 131072)
_E2E_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class FrontendMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "lightspeed_frontend_requests",
            "Requests by model, endpoint and status",
            ["model", "endpoint", "status"],
            registry=r,
        )
        self.inflight = Gauge("lightspeed_frontend_inflight_requests", "Requests in flight", ["model"], registry=r)
        self.ttft = Histogram(
            "lightspeed_frontend_time_to_first_token_seconds",
            "Time to first token",
            ["model"],
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "lightspeed_frontend_inter_token_latency_seconds",
            "Inter-token latency",
            ["model"],
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "lightspeed_frontend_request_duration_seconds",
            "Request duration",
            ["model"],
            buckets=_E2E_BUCKETS,
            registry=r,
        )
        self.isl = Histogram(
            "lightspeed_frontend_input_sequence_tokens",
            "Prompt length in tokens",
            ["model"],
            buckets=_LEN_BUCKETS,
            registry=r,
        )
        self.osl = Histogram(
            "lightspeed_frontend_output_sequence_tokens",
            "Output length in tokens",
            ["model"],
            buckets=_LEN_BUCKETS,
            registry=r,
        )
        self.cached = Counter(
            "lightspeed_frontend_cached_tokens", "Prompt tokens served from prefix cache", ["model"], registry=r
        )
        self.workers = Gauge("lightspeed_frontend_workers", "Workers known from discovery", registry=r)
        self.migrations = Counter(
            "lightspeed_frontend_migrations", "Requests migrated to another worker", ["model"], registry=r
        )
        self.loop_lag = Gauge(
            "lightspeed_frontend_event_loop_lag_seconds",
            "Largest delay of the frontend's event loop timers since the previous scrape (CPU-bound when high)",
            registry=r,
        )
        self.loop_lag_total = Gauge(
            "lightspeed_frontend_event_loop_lag_total_seconds", "Event loop timer delay summed since start", registry=r
        )
        self.loop_monitor = LoopLagMonitor()

    def render(self) -> bytes:
        self.loop_lag.set(self.loop_monitor.take_max())
        self.loop_lag_total.set(self.loop_monitor.total_lag)
        return generate_latest(self.registry)
