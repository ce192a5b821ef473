"""Live inputs of the planner: the frontend's /metrics over HTTP and the workers' forward-pass
metrics over the event plane. The parsing and arithmetic live in observe.py; this is the I/O.

`FrontendObserver` keeps the previous scrape and answers each interval's difference; a failed
scrape answers None (the planner then goes to its minimum) and keeps the older scrape, so the
next good one covers the whole gap with the right duration. `ForwardPassFollower` connects an
event-plane subscriber to every worker that discovery reports and feeds an aggregator.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import aiohttp
import msgspec

from lightspeed.planner.observe import (
    ForwardPassAggregator,
    ForwardPassSummary,
    FrontendInterval,
    FrontendSnapshot,
    IntervalObservation,
    frontend_interval,
    parse_frontend_metrics,
)
from lightspeed.protocol import TOPIC_FORWARD_PASS, ForwardPassMetrics
from lightspeed.runtime.discovery import Discovery
from lightspeed.runtime.event_plane import Subscriber, consume

log = logging.getLogger(__name__)
Fetch = Callable[[], Awaitable[str]]
_decode_fpm = msgspec.msgpack.Decoder(ForwardPassMetrics).decode


def http_fetch(session: aiohttp.ClientSession, url: str, timeout_s: float = 5.0) -> Fetch:
    """A fetch of `url` (the frontend's /metrics) that raises on a non-200 answer."""

    async def fetch() -> str:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            resp.raise_for_status()
            return await resp.text()

    return fetch


class FrontendObserver:
    def __init__(self, fetch: Fetch, model: str | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self._fetch = fetch
        self._model = model
        self._clock = clock
        self._prev: tuple[float, FrontendSnapshot] | None = None

    async def observe(self) -> FrontendInterval | None:
        """The interval since the previous good scrape; None on the first or a failed scrape."""
        try:
            text = await self._fetch()
            snap = parse_frontend_metrics(text, self._model)
        except (aiohttp.ClientError, TimeoutError, ValueError, OSError) as err:
            log.warning("planner: cannot read the frontend's metrics: %s", err)
            return None
        now = self._clock()
        prev, self._prev = self._prev, (now, snap)
        if prev is None:
            return None
        return frontend_interval(prev[1], snap, now - prev[0])


class ForwardPassFollower:
    """Subscribes to `forward-pass-metrics` of every worker in discovery."""

    def __init__(self, discovery: Discovery, subscriber: Subscriber, aggregator: ForwardPassAggregator) -> None:
        self._discovery = discovery
        self._sub = subscriber
        self.aggregator = aggregator
        self._addresses: dict[str, str] = {}
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._watch(), name="planner-fpm-watch"),
            asyncio.create_task(consume(self._sub, TOPIC_FORWARD_PASS, _decode_fpm, self.aggregator.add)),
        ]

    async def _watch(self) -> None:
        async for event in self._discovery.watch():
            card = event.card
            if event.kind == "put" and card is not None and card.events_address and card.address:
                if event.instance_id not in self._addresses:
                    self._addresses[event.instance_id] = card.events_address
                    self._sub.connect(card.events_address)
            elif event.kind == "delete":
                address = self._addresses.pop(event.instance_id, None)
                if address is not None:
                    self._sub.disconnect(address)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._sub.close()
        await self._discovery.close()


class PlannerObserver:
    """Both sources for one interval: the frontend's deltas and the steps since the last call."""

    def __init__(self, frontend: FrontendObserver, steps: ForwardPassAggregator | None = None) -> None:
        self._frontend = frontend
        self._steps = steps

    async def observe(self) -> IntervalObservation:
        front = await self._frontend.observe()
        steps = self._steps.take() if self._steps is not None else ForwardPassSummary()
        return IntervalObservation(front, steps)
