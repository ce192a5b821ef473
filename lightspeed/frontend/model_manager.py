"""The frontend's live view of which models are served by which workers.

Built only from discovery: a worker's card names its model and a local folder with the tokenizer,
so a frontend needs no model flags of its own. A model disappears from /v1/models when its last
worker leaves; its tokenizer stays cached for when a worker comes back.

A worker that fails a request at the transport level (cannot be dialled, connection dropped,
draining) is reported down and kept out of routing for a while: a killed process stays in
discovery until its entry expires, and without this every request routed to it in that window
would fail. Discovery still has the final word: the entry expires (the worker is gone) or the
quarantine ends and a live worker is routed to again. Until then /health shows such a worker as
unhealthy (`is_healthy`), since the frontend already knows it cannot reach it. A worker that
leaves discovery stays "down" for the same while: a request pinned to it (named rightly a moment
ago) gets 503, retry elsewhere, rather than 400, no such worker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lightspeed.frontend.preprocess import Preprocessor
from lightspeed.protocol import WorkerCard, WorkerRole
from lightspeed.runtime.discovery import Discovery

log = logging.getLogger(__name__)
BACKEND_COMPONENT = "backend"


@dataclass
class ModelEntry:
    name: str
    preprocessor: Preprocessor
    context_length: int
    created: int
    workers: dict[str, WorkerCard] = field(default_factory=dict)
    down_until: dict[str, float] = field(default_factory=dict)  # instance id -> monotonic deadline

    def serving_workers(self) -> list[WorkerCard]:
        """Workers that take whole requests (aggregated or decode role), in a stable order."""
        cards = [c for c in self.workers.values() if c.role != WorkerRole.PREFILL]
        if self.down_until:
            cards = [c for c in cards if not self.is_down(c.instance_id)]
        cards.sort(key=lambda c: c.instance_id)
        return cards

    def prefill_workers(self) -> list[WorkerCard]:
        """Prefill-role workers (disaggregation's prefill pool), reachable, in a stable order."""
        cards = [c for c in self.workers.values() if c.role == WorkerRole.PREFILL and not self.is_down(c.instance_id)]
        cards.sort(key=lambda c: c.instance_id)
        return cards

    def is_down(self, instance_id: str) -> bool:
        deadline = self.down_until.get(instance_id)
        if deadline is None:
            return False
        if time.monotonic() < deadline:
            return True
        del self.down_until[instance_id]  # quarantine over: route to it again
        return False

    def prune_down(self) -> None:
        """Forget quarantines that are over (those of departed workers are never looked up)."""
        now = time.monotonic()
        for instance_id in [i for i, deadline in self.down_until.items() if deadline <= now]:
            del self.down_until[instance_id]


class ModelManager:
    def __init__(self, discovery: Discovery, served_model_name: str = "", down_seconds: float = 10.0) -> None:
        if down_seconds <= 0:
            raise ValueError(f"down_seconds must be > 0; got {down_seconds}")
        self._discovery = discovery
        self._down_seconds = down_seconds  # how long a worker reported down stays out of routing
        self._override = served_model_name
        self._models: dict[str, ModelEntry] = {}
        self._tokenizers: dict[str, Preprocessor] = {}
        self._worker_model: dict[str, str] = {}
        self._task: asyncio.Task[None] | None = None
        self.on_worker_removed: list[Callable[[str], None]] = []
        self.on_worker_added: list[Callable[[WorkerCard], None]] = []
        # Cards of other components (router replicas) are not workers: they go to these instead.
        self.on_peer_added: list[Callable[[WorkerCard], None]] = []
        self.on_peer_removed: list[Callable[[str], None]] = []
        self._peers: set[str] = set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._watch(), name="model-manager-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def get(self, name: str) -> ModelEntry | None:
        """The model, if any worker ever served it (it may have no workers right now)."""
        return self._models.get(name)

    def models(self) -> list[ModelEntry]:
        return [m for m in self._models.values() if m.workers]

    def all_workers(self) -> list[WorkerCard]:
        return [c for m in self._models.values() for c in m.workers.values()]

    def is_healthy(self, instance_id: str) -> bool:
        """Registered and not reported down (a failed dial or dropped connection)."""
        name = self._worker_model.get(instance_id)
        return name is not None and not self._models[name].is_down(instance_id)

    def report_down(self, instance_id: str) -> None:
        """Keep a worker that failed at the transport level out of routing for a while."""
        name = self._worker_model.get(instance_id)
        if name is None:
            return  # already gone from discovery
        self._models[name].down_until[instance_id] = time.monotonic() + self._down_seconds
        log.warning("worker %s is unreachable; not routing to it for %.1fs", instance_id, self._down_seconds)

    async def _watch(self) -> None:
        async for event in self._discovery.watch():
            try:
                if event.kind == "put" and event.card is not None:
                    await self._add(event.card)
                else:
                    self._remove(event.instance_id)
            except Exception:  # a bad card must not stop the watch loop
                log.exception("discovery event %s for %s failed", event.kind, event.instance_id)

    async def _add(self, card: WorkerCard) -> None:
        if card.component != BACKEND_COMPONENT:
            self._peers.add(card.instance_id)
            for peer_callback in self.on_peer_added:
                peer_callback(card)
            return
        name = self._override or card.model
        if self._worker_model.get(card.instance_id) == name:
            known = self._models[name]
            known.workers[card.instance_id] = card
            known.down_until.pop(card.instance_id, None)  # it registered again: it is alive
            return
        entry = self._models.get(name)
        if entry is None:
            pre = await self._load_tokenizer(card.model_path)
            entry = ModelEntry(name, pre, card.context_length, int(time.time()))
            self._models[name] = entry
        entry.workers[card.instance_id] = card
        entry.down_until.pop(card.instance_id, None)  # back after it left: alive again
        self._worker_model[card.instance_id] = name
        log.info("worker %s at %s serves %s", card.instance_id, card.address, name)
        for callback in self.on_worker_added:
            callback(card)

    def _remove(self, instance_id: str) -> None:
        if instance_id in self._peers:
            self._peers.discard(instance_id)
            for peer_callback in self.on_peer_removed:
                peer_callback(instance_id)
            return
        name = self._worker_model.pop(instance_id, None)
        if name is None:
            return
        entry = self._models[name]
        entry.workers.pop(instance_id, None)
        entry.prune_down()
        entry.down_until[instance_id] = time.monotonic() + self._down_seconds
        log.info("worker %s left (%s)", instance_id, name)
        for callback in self.on_worker_removed:
            callback(instance_id)

    async def _load_tokenizer(self, folder: str) -> Preprocessor:
        pre = self._tokenizers.get(folder)
        if pre is None:
            pre = await asyncio.to_thread(Preprocessor.from_folder, Path(folder))
            self._tokenizers[folder] = pre
        return pre
