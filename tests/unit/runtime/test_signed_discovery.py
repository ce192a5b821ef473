"""Signed discovery cards: only cards signed with the cluster secret reach the frontend."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import msgspec
import pytest

from lightspeed.protocol import WorkerCard
from lightspeed.runtime.cluster_auth import ClusterKey
from lightspeed.runtime.discovery import DiscoveryEvent, FileDiscovery, MemDiscovery
from lightspeed.runtime.signed_discovery import SignedDiscovery, card_is_genuine, card_payload, sign_card

KEY = ClusterKey.from_secret("discovery-test-secret")
GENUINE = WorkerCard("w-genuine", "m", "127.0.0.1:1000", total_kv_blocks=64)
FORGED = WorkerCard("w-forged", "m", "10.6.6.6:6666")


def test_signature_covers_every_field() -> None:
    signed = sign_card(GENUINE, KEY)
    assert card_is_genuine(signed, KEY)
    assert card_payload(signed) == card_payload(GENUINE)  # the signature itself is not covered
    moved = msgspec.structs.replace(signed, address="10.6.6.6:6666")  # a copied signature on an altered card
    assert not card_is_genuine(moved, KEY)
    assert not card_is_genuine(GENUINE, KEY)  # unsigned
    assert not card_is_genuine(sign_card(GENUINE, ClusterKey.from_secret("some-other-secret")), KEY)


async def test_forged_cards_are_dropped_from_list_and_watch(caplog: pytest.LogCaptureFixture) -> None:
    inner = MemDiscovery("signed-test")
    signed = SignedDiscovery(MemDiscovery("signed-test"), KEY)
    await signed.register(GENUINE)
    with caplog.at_level(logging.WARNING):
        await inner.register(FORGED)  # written by someone without the secret
        await inner.register(sign_card(FORGED, ClusterKey.from_secret("attacker-own-secret")))
        assert [c.instance_id for c in await signed.list_cards()] == ["w-genuine"]
        events: list[DiscoveryEvent] = []
        watch = signed.watch()
        events.append(await asyncio.wait_for(anext(watch), 1))
        await inner.deregister("w-forged")  # deletions pass (they carry no card to check)
        events.append(await asyncio.wait_for(anext(watch), 1))
        await watch.aclose()
    assert [(e.kind, e.instance_id) for e in events] == [("put", "w-genuine"), ("delete", "w-forged")]
    assert caplog.text.count("ignoring discovery card w-forged") == 1  # logged once per instance id
    await signed.close()
    await inner.close()


async def test_file_backend_round_trip_keeps_signatures_valid(tmp_path: Path) -> None:
    writer = SignedDiscovery(FileDiscovery(tmp_path, ttl=5, heartbeat_interval=1, poll_interval=0.01), KEY)
    reader = SignedDiscovery(FileDiscovery(tmp_path, ttl=5, heartbeat_interval=1, poll_interval=0.01), KEY)
    forger = FileDiscovery(tmp_path, ttl=5, heartbeat_interval=1, poll_interval=0.01)
    try:
        await writer.register(GENUINE)
        await forger.register(FORGED)
        assert [c.instance_id for c in await reader.list_cards()] == ["w-genuine"]
        assert (await reader.list_cards())[0].signature == sign_card(GENUINE, KEY).signature
    finally:
        for d in (writer, reader, forger):
            await d.close()
