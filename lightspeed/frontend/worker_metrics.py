"""Follow the load metrics workers publish on the event plane and expose them on /metrics.

The frontend connects its subscriber to each worker's publisher as discovery reports it, so an
operator (and the tests) can see per-worker KV usage and queue depth in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import msgspec
from prometheus_client import CollectorRegistry, Gauge

from lightspeed.protocol import TOPIC_LOAD_METRICS, LoadMetrics, WorkerCard
from lightspeed.runtime.event_plane import Subscriber, consume

log = logging.getLogger(__name__)
_decode = msgspec.msgpack.Decoder(LoadMetrics).decode


class WorkerMetricsWatcher:
    def __init__(self, subscriber: Subscriber, registry: CollectorRegistry) -> None:
        self._sub = subscriber
        self._addresses: dict[str, str] = {}
        self.latest: dict[str, LoadMetrics] = {}
        self._task: asyncio.Task[None] | None = None
        labels = ["worker"]
        self._active = Gauge("lightspeed_worker_kv_active_blocks", "KV blocks in use", labels, registry=registry)
        self._total = Gauge("lightspeed_worker_kv_total_blocks", "KV blocks in the pool", labels, registry=registry)
        self._cached = Gauge(
            "lightspeed_worker_kv_cached_blocks", "Reusable cached KV blocks", labels, registry=registry
        )
        self._running = Gauge("lightspeed_worker_requests_running", "Requests running", labels, registry=registry)
        self._waiting = Gauge("lightspeed_worker_requests_waiting", "Requests waiting", labels, registry=registry)
        self._wall = Gauge(
            "lightspeed_worker_step_wall_seconds", "Busy wall-clock seconds of engine steps", labels, registry=registry
        )
        self._modelled = Gauge(
            "lightspeed_worker_step_modelled_seconds",
            "Seconds the timing model gave those steps (mocker workers)",
            labels,
            registry=registry,
        )
        self._lag = Gauge(
            "lightspeed_worker_step_lag_seconds",
            "Wall minus modelled time over the current busy period: how far a mocker worker is behind its model",
            labels,
            registry=registry,
        )
        self._lag_max = Gauge(
            "lightspeed_worker_step_lag_max_seconds",
            "Largest step lag within the last metrics interval",
            labels,
            registry=registry,
        )
        self._preemptions = Gauge(
            "lightspeed_worker_preemptions",
            "Requests preempted for lack of KV blocks since the worker started",
            labels,
            registry=registry,
        )
        self._gauges = (
            self._active,
            self._total,
            self._cached,
            self._running,
            self._waiting,
            self._wall,
            self._modelled,
            self._lag,
            self._lag_max,
            self._preemptions,
        )

    def worker_added(self, card: WorkerCard) -> None:
        if card.events_address and card.instance_id not in self._addresses:
            self._addresses[card.instance_id] = card.events_address
            self._sub.connect(card.events_address)

    def worker_removed(self, instance_id: str) -> None:
        address = self._addresses.pop(instance_id, None)
        if address is not None:
            self._sub.disconnect(address)
        self.latest.pop(instance_id, None)
        for gauge in self._gauges:
            with contextlib.suppress(KeyError):
                gauge.remove(instance_id)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="worker-metrics")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._sub.close()

    async def _loop(self) -> None:
        await consume(self._sub, TOPIC_LOAD_METRICS, _decode, self.handle)

    def handle(self, m: LoadMetrics) -> None:
        if m.worker_id not in self._addresses:
            return  # a late message from a worker that already left
        self.latest[m.worker_id] = m
        self._active.labels(m.worker_id).set(m.kv_active_blocks)
        self._total.labels(m.worker_id).set(m.kv_total_blocks)
        self._cached.labels(m.worker_id).set(m.kv_cached_blocks)
        self._running.labels(m.worker_id).set(m.num_running)
        self._waiting.labels(m.worker_id).set(m.num_waiting)
        self._wall.labels(m.worker_id).set(m.step_wall_seconds)
        self._modelled.labels(m.worker_id).set(m.step_modelled_seconds)
        self._lag.labels(m.worker_id).set(m.step_lag_seconds)
        self._lag_max.labels(m.worker_id).set(m.step_lag_max_seconds)
        self._preemptions.labels(m.worker_id).set(m.num_preemptions)
