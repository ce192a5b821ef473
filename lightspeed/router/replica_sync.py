"""Router replicas share their active-load state over the event plane.

Several frontends (behind one port with SO_REUSEPORT, or on several ports) each route part of
the traffic. Without sharing, each sees only its own requests and they all pile onto the same
"idle" worker. So every replica broadcasts its load changes (add at routing, prefill done at the
first token, free at the end) on topic `router-sync`, and mirrors everyone else's into its own
`ActiveLoad`; in approximate mode the `add` also tells peers which blocks were sent where.
Replicas find each other through discovery: each registers a card with component "router"
whose `events_address` is its publisher. Request ids are unique (uuid), so mirrored entries
never collide with local ones; a replica that dies leaves entries that expire as stale.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable

import msgspec

from lightspeed.protocol import WorkerCard
from lightspeed.router.active import ActiveLoad, LoadChange
from lightspeed.runtime.discovery import Discovery
from lightspeed.runtime.event_plane import Publisher, Subscriber, consume

log = logging.getLogger(__name__)

TOPIC_ROUTER_SYNC = "router-sync"
ROUTER_COMPONENT = "router"


class SyncMessage(msgspec.Struct, frozen=True, array_like=True):
    router_id: str
    kind: str
    request_id: str
    worker_id: str = ""
    prefill_tokens: int = 0
    hashes: list[int] = []
    extra_blocks: int = 0


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(SyncMessage).decode


class ReplicaSync:
    def __init__(
        self,
        active: ActiveLoad,
        publisher: Publisher,
        subscriber: Subscriber,
        discovery: Discovery,
        namespace: str,
        on_remote: Callable[[LoadChange], None] | None = None,
    ) -> None:
        self.router_id = f"router-{uuid.uuid4().hex[:12]}"
        self._active = active
        self._pub = publisher
        self._sub = subscriber
        self._discovery = discovery
        self._namespace = namespace
        self._on_remote = on_remote
        self._peers: dict[str, str] = {}  # router id -> events address
        self._task: asyncio.Task[None] | None = None
        self.mirrored = 0
        active.listeners.append(self._broadcast)

    @property
    def card(self) -> WorkerCard:
        return WorkerCard(
            instance_id=self.router_id,
            model="",
            address="",
            namespace=self._namespace,
            component=ROUTER_COMPONENT,
            events_address=self._pub.address,
        )

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="router-sync")
        await self._discovery.register(self.card)

    async def stop(self) -> None:
        await self._discovery.deregister(self.router_id)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._sub.close()
        self._pub.close()

    def peer_added(self, card: WorkerCard) -> None:
        if card.instance_id == self.router_id or card.instance_id in self._peers:
            return
        self._peers[card.instance_id] = card.events_address
        self._sub.connect(card.events_address)
        log.info("router replica %s sees peer %s", self.router_id, card.instance_id)

    def peer_removed(self, instance_id: str) -> None:
        address = self._peers.pop(instance_id, None)
        if address is not None:
            self._sub.disconnect(address)

    @property
    def peers(self) -> list[str]:
        return sorted(self._peers)

    def _broadcast(self, change: LoadChange) -> None:
        msg = SyncMessage(
            self.router_id,
            change.kind,
            change.request_id,
            change.worker_id,
            change.prefill_tokens,
            list(change.hashes),
            change.extra_blocks,
        )
        self._pub.publish(TOPIC_ROUTER_SYNC, _encode(msg))

    def apply(self, msg: SyncMessage) -> None:
        if msg.router_id == self.router_id:
            return
        change = LoadChange(
            msg.kind, msg.request_id, msg.worker_id, msg.prefill_tokens, tuple(msg.hashes), msg.extra_blocks
        )
        self._active.apply(change)
        self.mirrored += 1
        if self._on_remote is not None:
            self._on_remote(change)

    async def _loop(self) -> None:
        await consume(self._sub, TOPIC_ROUTER_SYNC, _decode, self.apply)
