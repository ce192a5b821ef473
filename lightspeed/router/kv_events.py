"""Feed the router's prefix index from the workers' KV events, recovering from gaps.

The event plane is best effort: a subscriber that connects late (ZMQ's slow joiner), a full
queue or a restart loses events. Every event carries a per-worker monotonic id, so the index
notices a gap and this feed asks that worker for a snapshot (`kv_dump` on the request plane:
Cleared + all cached blocks, stamped with the id it reflects). Events that arrive while the
snapshot is in flight are held and replayed after it, skipping those the snapshot already
covers. A new worker is snapshotted at once (it may have cached blocks before we connected);
a worker that leaves discovery has all its blocks dropped. On an event plane that keeps history
(NATS JetStream) a new worker's past events are replayed instead of snapshotted.
"""

from __future__ import annotations

import asyncio
import logging

import msgspec

from lightspeed.errors import WorkerError, WorkerLost
from lightspeed.protocol import TOPIC_KV_EVENTS, KvEvent, KvStored, WorkerCard
from lightspeed.router.indexer import KvIndex
from lightspeed.router.metrics import RouterMetrics
from lightspeed.runtime.event_plane import Subscriber, consume
from lightspeed.runtime.request_plane import RequestPlaneClient

log = logging.getLogger(__name__)
_decode = msgspec.msgpack.Decoder(KvEvent).decode
_RESYNC_RETRY_S = 0.5
_MAX_HELD = 100_000  # events held per worker during a resync; past this, resync again


class KvEventFeed:
    def __init__(
        self, subscriber: Subscriber, index: KvIndex, client: RequestPlaneClient, metrics: RouterMetrics | None = None
    ) -> None:
        self._sub = subscriber
        self.index = index
        self._client = client
        self._metrics = metrics
        self._cards: dict[str, WorkerCard] = {}
        self._held: dict[str, list[KvEvent]] = {}  # worker -> events received during its resync
        self._resyncs: dict[str, asyncio.Task[None]] = {}
        self._task: asyncio.Task[None] | None = None
        self.applied = 0
        self.resynced = 0
        self.replayed = 0  # events a history-keeping event plane said it would replay

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="kv-event-feed")

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._resyncs.values()) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._sub.close()

    def worker_added(self, card: WorkerCard) -> None:
        if card.instance_id in self._cards or not card.events_address:
            return
        self._cards[card.instance_id] = card
        self._sub.connect(card.events_address)
        if self._sub.keeps_history:
            self._resyncs[card.instance_id] = asyncio.create_task(
                self._replay_or_dump(card), name=f"kv-replay-{card.instance_id}"
            )
        else:
            self._start_resync(card.instance_id)

    def worker_removed(self, instance_id: str) -> None:
        card = self._cards.pop(instance_id, None)
        if card is None:
            return
        self._sub.disconnect(card.events_address)
        task = self._resyncs.pop(instance_id, None)
        if task is not None:
            task.cancel()
        self._held.pop(instance_id, None)
        self.index.remove_worker(instance_id)
        self._update_gauge()

    def handle(self, event: KvEvent) -> None:
        """Apply one live event (or hold it while its worker is being resynced)."""
        wid = event.worker_id
        if wid not in self._cards:
            return  # a late event of a worker that left, or one we have not discovered yet
        held = self._held.get(wid)
        if held is not None:
            held.append(event)
            if len(held) > _MAX_HELD:
                log.warning("worker %s: %d events held during resync; starting over", wid, len(held))
                self._start_resync(wid)
            return
        if self.index.apply(event):
            self.applied += 1
            if self._metrics is not None:
                self._metrics.kv_events.inc()
                self._metrics.indexed_blocks.set(self.index.num_blocks)
            return
        log.info(
            "worker %s: KV event gap (got %d after %s); resyncing", wid, event.event_id, self.index.last_event_id(wid)
        )
        self._start_resync(wid, first_held=event)

    async def _loop(self) -> None:
        await consume(self._sub, TOPIC_KV_EVENTS, _decode, self.handle)

    def _start_resync(self, worker_id: str, first_held: KvEvent | None = None) -> None:
        old = self._resyncs.pop(worker_id, None)
        if old is not None:
            old.cancel()
        self._held[worker_id] = [first_held] if first_held is not None else []
        self._resyncs[worker_id] = asyncio.create_task(self._resync(worker_id), name=f"kv-resync-{worker_id}")

    async def _replay_or_dump(self, card: WorkerCard) -> None:
        """A brokered stream (NATS JetStream) replays the worker's past events as ordinary ones,
        and a trimmed history shows as a gap that resyncs. Only a worker with nothing retained is
        asked for a dump: it may hold blocks whose events the stream no longer has."""
        wid = card.instance_id
        try:
            retained = await self._sub.retained(card.events_address)
        except Exception as err:  # the broker's own errors vary; a dump is always correct
            log.warning("worker %s: cannot read its retained KV events (%s); asking for a dump", wid, err)
            retained = 0
        if self._resyncs.get(wid) is not asyncio.current_task():
            return  # superseded by a gap's resync, or the worker left
        del self._resyncs[wid]
        self.replayed += retained
        if retained == 0 and self.index.last_event_id(wid) is None:
            self._start_resync(wid)

    async def _resync(self, worker_id: str) -> None:
        while worker_id in self._cards:
            try:
                snapshot = await self._fetch_dump(self._cards[worker_id])
            except (WorkerLost, WorkerError, OSError) as err:
                log.warning("worker %s: KV dump failed (%s); retrying", worker_id, err)
                await asyncio.sleep(_RESYNC_RETRY_S)
                continue
            self._finish_resync(worker_id, snapshot)
            return

    async def _fetch_dump(self, card: WorkerCard) -> list[KvEvent]:
        stream = await self._client.stream(card.address, "kv_dump", b"")
        try:
            return [_decode(payload) async for payload in stream]
        finally:
            await stream.aclose()

    def _finish_resync(self, worker_id: str, snapshot: list[KvEvent]) -> None:
        dump_id = snapshot[0].event_id if snapshot else 0
        stored = [e for e in snapshot if isinstance(e.data, KvStored)]  # the leading Cleared is implied
        self.index.apply_dump(worker_id, stored, dump_event_id=dump_id)
        held = self._held.pop(worker_id, [])
        self._resyncs.pop(worker_id, None)
        self.resynced += 1
        if self._metrics is not None:
            self._metrics.resyncs.inc()
        log.info(
            "worker %s: resynced at event %d (%d blocks, %d held events)",
            worker_id,
            dump_id,
            self.index.worker_blocks(worker_id),
            len(held),
        )
        for event in held:
            if event.event_id > dump_id:
                self.handle(event)
        self._update_gauge()

    def _update_gauge(self) -> None:
        if self._metrics is not None:
            self._metrics.indexed_blocks.set(self.index.num_blocks)
