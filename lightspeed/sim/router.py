"""The production router's selection logic, driven synchronously in virtual time.

Built the way the frontend builds it (`router.factory`: the same modes and `RouterConfig`), with
the active set on the simulation clock. What `PushRouter` does around a decision is mirrored
here at the same moments the frontend does it: `active.add` when a request is routed,
`prefill_done` at its first token, `free` when its stream ends. KV events reach the exact index
as the event feed applies them (`KvIndex.apply`, in order, numbered per worker); events of a
worker that left discovery are dropped, as `KvEventFeed.handle` drops them.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence

from lightspeed.config import KV_ROUTER_MODES, RouterConfig
from lightspeed.protocol import KvEvent, WorkerCard
from lightspeed.router.active import ActiveLoad
from lightspeed.router.factory import kv_router_config
from lightspeed.router.indexer import ApproxIndex, KvIndex
from lightspeed.router.kv_router import KvSelector
from lightspeed.router.selector import (
    PickSelector,
    PowerOfTwoSelector,
    RandomSelector,
    RouteDecision,
    RouteRequest,
    make_selector,
)

log = logging.getLogger(__name__)


def build_selector(
    mode: str, cfg: RouterConfig, active: ActiveLoad, clock: Callable[[], float], seed: int
) -> KvSelector | PickSelector:
    """`factory.build_selector`, seeded (a replay must be repeatable) and, in approximate mode,
    with the index's TTL on the simulation clock."""
    if mode in KV_ROUTER_MODES:
        kv_cfg = dataclasses.replace(kv_router_config(mode, cfg), seed=seed)
        index = None if kv_cfg.use_kv_events else ApproxIndex(kv_cfg.approx_ttl, clock=clock)
        return KvSelector(active, kv_cfg, index=index)
    if mode == "random":
        return RandomSelector(active, seed=seed)
    if mode == "power-of-two":
        return PowerOfTwoSelector(active, seed=seed)
    return make_selector(mode, active)


class SimRouter:
    def __init__(self, mode: str, cfg: RouterConfig, clock: Callable[[], float], seed: int = 0) -> None:
        self.active = ActiveLoad(clock=clock)
        self.selector = build_selector(mode, cfg, self.active, clock, seed)
        index = self.selector.index if isinstance(self.selector, KvSelector) else None
        self.index = index if isinstance(index, KvIndex) else None
        self._workers: set[str] = set()
        self.kv_events_applied = 0

    def add_worker(self, worker_id: str) -> None:
        self._workers.add(worker_id)

    def remove_worker(self, worker_id: str) -> None:
        """The worker left discovery (drained): `PushRouter.remove_worker` and the event feed."""
        self._workers.discard(worker_id)
        self.active.remove_worker(worker_id)
        self.selector.remove_worker(worker_id)

    def route(self, req: RouteRequest, workers: Sequence[WorkerCard]) -> RouteDecision | None:
        """Choose a worker and record the load (`PushRouter.route`); None when all are busy."""
        if isinstance(self.selector, KvSelector):
            decision = self.selector.try_route(req, workers)
        else:
            decision = self.selector.decision_for(req, self.selector.pick(req, workers))
        if decision is not None:
            self.active.add(
                req.request_id, decision.card.instance_id, decision.prefill_tokens, decision.blocks, decision.hashes
            )
        return decision

    def on_kv_events(self, events: list[KvEvent]) -> None:
        if self.index is None:
            return
        for event in events:
            if event.worker_id not in self._workers:
                continue
            if not self.index.apply(event):  # cannot happen in-process: events are never lost
                raise RuntimeError(f"KV event gap from {event.worker_id} at {event.event_id}")
            self.kv_events_applied += 1

    def prefill_done(self, request_id: str) -> None:
        self.active.prefill_done(request_id)

    def free(self, request_id: str) -> None:
        self.active.free(request_id)
