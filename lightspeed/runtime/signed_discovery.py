"""Discovery cards signed with the cluster secret, whatever the backend (mem, file, etcd).

A worker's card tells every frontend where to send prompts, so a card anyone could write (a
shared discovery folder, an etcd prefix without credentials) would let them receive prompts and
inject replies. With a cluster secret, `SignedDiscovery` signs each card it registers and lets
through only cards whose signature checks; a forged or altered card is dropped and logged (once
per instance id, so a flood of forgeries cannot flood the log).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator

import msgspec

from lightspeed.protocol import WorkerCard
from lightspeed.runtime.cluster_auth import ClusterKey
from lightspeed.runtime.discovery import Discovery, DiscoveryEvent

log = logging.getLogger(__name__)

_MAX_REMEMBERED = 4096  # forged instance ids logged so far (bounded: ids come from outside)
_encoder = msgspec.msgpack.Encoder()


def card_payload(card: WorkerCard) -> bytes:
    """The bytes a signature covers: every field but the signature, in declaration order."""
    return _encoder.encode(msgspec.structs.replace(card, signature=""))


def sign_card(card: WorkerCard, key: ClusterKey) -> WorkerCard:
    return msgspec.structs.replace(card, signature=key.sign(card_payload(card)))


def card_is_genuine(card: WorkerCard, key: ClusterKey) -> bool:
    return bool(card.signature) and key.verify(card_payload(card), card.signature)


class SignedDiscovery(Discovery):
    """Wraps a backend: signs on register, verifies on list and watch."""

    def __init__(self, inner: Discovery, key: ClusterKey) -> None:
        self.inner = inner
        self._key = key
        self._forged: set[str] = set()

    async def register(self, card: WorkerCard) -> None:
        await self.inner.register(sign_card(card, self._key))

    async def deregister(self, instance_id: str) -> None:
        await self.inner.deregister(instance_id)

    async def list_cards(self) -> list[WorkerCard]:
        return [c for c in await self.inner.list_cards() if self._check(c)]

    async def watch(self) -> AsyncGenerator[DiscoveryEvent, None]:
        source = self.inner.watch()
        try:
            async for event in source:
                if event.card is None or self._check(event.card):
                    yield event
        finally:
            await source.aclose()

    async def close(self) -> None:
        await self.inner.close()

    def _check(self, card: WorkerCard) -> bool:
        if card_is_genuine(card, self._key):
            return True
        if card.instance_id not in self._forged and len(self._forged) < _MAX_REMEMBERED:
            self._forged.add(card.instance_id)
            log.warning(
                "ignoring discovery card %s (address %s): its signature does not match the cluster secret",
                card.instance_id,
                card.address,
            )
        return False
