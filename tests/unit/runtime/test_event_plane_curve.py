"""The zmq event plane under the cluster secret: CURVE-encrypted, subscribers need the secret."""

from __future__ import annotations

import asyncio
import logging

import pytest

from lightspeed.config import PlaneConfig
from lightspeed.runtime.cluster_auth import ClusterKey
from lightspeed.runtime.event_plane import EventPublisher, EventSubscriber
from lightspeed.runtime.planes import event_plane_spec, warn_if_open
from tests.unit.runtime.test_event_plane import wait_live

KEY = ClusterKey.from_secret("event-plane-test-secret")


async def test_subscriber_with_the_secret_receives() -> None:
    pub = EventPublisher(curve_secret=KEY.events)
    sub = EventSubscriber(["kv"], curve_secret=ClusterKey.from_secret("event-plane-test-secret").events)
    try:
        sub.connect(pub.address)
        await wait_live(pub, sub, "kv")
        pub.publish("kv", b"payload")
        assert await asyncio.wait_for(sub.recv(), 2) == ("kv", b"payload")
    finally:
        sub.close()
        pub.close()


@pytest.mark.parametrize("other", [None, ClusterKey.from_secret("another-secret-here").events])
async def test_subscriber_without_the_secret_receives_nothing(other: bytes | None) -> None:
    pub = EventPublisher(curve_secret=KEY.events)
    sub = EventSubscriber(["kv"], curve_secret=other)
    try:
        sub.connect(pub.address)
        for _ in range(20):  # a second of publishing: nothing gets through the CURVE handshake
            pub.publish("kv", b"secret payload")
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(sub.recv(), 0.05)
    finally:
        sub.close()
        pub.close()


def test_bad_curve_key_is_refused() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        EventPublisher(curve_secret=b"short")


def test_plane_config_with_a_secret_gives_zmq_its_curve_key() -> None:
    assert event_plane_spec(PlaneConfig()).curve_secret is None
    spec = event_plane_spec(PlaneConfig(cluster_secret="event-plane-test-secret"))
    assert spec.curve_secret == KEY.events


@pytest.mark.parametrize(
    ("host", "secret", "warned"),
    [
        ("127.0.0.1", "", False),
        ("::1", "", False),
        ("localhost", "", False),
        ("0.0.0.0", "", True),
        ("10.1.2.3", "", True),
        ("0.0.0.0", "event-plane-test-secret", False),
    ],
)
def test_an_open_plane_on_a_public_address_is_a_loud_warning(
    host: str, secret: str, warned: bool, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        warn_if_open("request plane", host, PlaneConfig(cluster_secret=secret))
    assert ("SECURITY: the request plane listens on" in caplog.text) is warned
