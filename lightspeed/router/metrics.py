"""Prometheus metrics of the KV router: where the per-request routing time goes, and its inputs.

Overhead is split by phase (hashing the prompt, index lookup, cost + choice) so a regression
shows which part grew. Buckets run from 1 µs to 100 ms.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_OVERHEAD_BUCKETS = (1e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 1e-2, 1e-1)
_OVERLAP_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
PHASES = ("hash", "index", "schedule", "total")


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.overhead = Histogram(
            "lightspeed_router_overhead_seconds",
            "Routing time per request by phase (hash, index, schedule, total)",
            ["phase"],
            buckets=_OVERHEAD_BUCKETS,
            registry=r,
        )
        self._phase = {p: self.overhead.labels(p) for p in PHASES}
        self.overlap = Histogram(
            "lightspeed_router_overlap_blocks",
            "Prefix blocks already cached on the chosen worker",
            buckets=_OVERLAP_BUCKETS,
            registry=r,
        )
        self.decisions = Counter("lightspeed_router_decisions", "Routing decisions by worker", ["worker"], registry=r)
        self.queued = Gauge("lightspeed_router_queue_depth", "Requests waiting in the admission queue", registry=r)
        self.rejected = Counter(
            "lightspeed_router_rejected", "Requests refused because all workers were busy", registry=r
        )
        self.kv_events = Counter("lightspeed_router_kv_events", "KV events applied to the prefix index", registry=r)
        self.resyncs = Counter(
            "lightspeed_router_kv_resyncs", "Worker block sets reloaded after an event gap", registry=r
        )
        self.indexed_blocks = Gauge(
            "lightspeed_router_indexed_blocks", "(block, worker) pairs in the prefix index", registry=r
        )

    def observe(self, hash_s: float, index_s: float, schedule_s: float) -> None:
        self._phase["hash"].observe(hash_s)
        self._phase["index"].observe(index_s)
        self._phase["schedule"].observe(schedule_s)
        self._phase["total"].observe(hash_s + index_s + schedule_s)
