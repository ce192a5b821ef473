"""planes.py: backend specs from PlaneConfig, and the address a process advertises."""

from __future__ import annotations

import logging

import pytest

from lightspeed.config import PlaneConfig
from lightspeed.runtime.discovery import DiscoverySpec
from lightspeed.runtime.event_plane import EventPlaneSpec, EventPublisher
from lightspeed.runtime.planes import (
    AdvertisedPublisher,
    advertise_host,
    advertised,
    discovery_spec,
    event_plane_spec,
    publisher_from_config,
)


def test_advertised_replaces_the_host_of_dial_addresses() -> None:
    assert advertised("0.0.0.0:5000", "10.0.0.2") == "10.0.0.2:5000"
    assert advertised("tcp://0.0.0.0:5000", "10.0.0.2") == "tcp://10.0.0.2:5000"
    assert advertised("tcp://[::]:5000", "fd00::2") == "tcp://[fd00::2]:5000"
    # a NATS publisher's address names subjects, not a socket: left alone
    assert advertised("nats://n:4222/abc", "10.0.0.2") == "nats://n:4222/abc"


def test_advertise_host(caplog: pytest.LogCaptureFixture) -> None:
    assert advertise_host("10.0.0.5", "") == "10.0.0.5"
    assert advertise_host("0.0.0.0", "worker-1.internal") == "worker-1.internal"
    with caplog.at_level(logging.WARNING):
        guessed = advertise_host("0.0.0.0", "")
    assert guessed not in ("", "0.0.0.0")
    assert "without --advertise-host" in caplog.text


def test_zmq_publisher_on_a_wildcard_advertises_the_given_host() -> None:
    pub = publisher_from_config(PlaneConfig(), "0.0.0.0", "10.9.8.7")
    try:
        assert isinstance(pub, AdvertisedPublisher) and isinstance(pub.inner, EventPublisher)
        assert pub.address.startswith("tcp://10.9.8.7:")
        assert pub.address.rsplit(":", 1)[1] == pub.inner.address.rsplit(":", 1)[1]
    finally:
        pub.close()
    plain = publisher_from_config(PlaneConfig(), "127.0.0.1")
    try:
        assert isinstance(plain, EventPublisher)  # nothing to rewrite: no wrapper
    finally:
        plain.close()


def test_specs_from_config() -> None:
    cfg = PlaneConfig(
        discovery="etcd",
        etcd_endpoints="https://e1:2379,https://e2:2379",
        etcd_user="u",
        etcd_password="p",
        etcd_ca="ca.pem",
        discovery_ttl=4,
        namespace="prod",
        event_plane="nats",
        nats_url="tls://n1:4222",
        nats_creds="x.creds",
        nats_kv_max_age=60,
    )
    assert discovery_spec(cfg) == DiscoverySpec("https://e1:2379,https://e2:2379", "prod", 4, "u", "p", "ca.pem")
    got = event_plane_spec(cfg)
    assert (got.address, got.namespace, got.creds_file, got.stream_max_age) == ("tls://n1:4222", "prod", "x.creds", 60)
    assert event_plane_spec(PlaneConfig(), "tcp://h:0") == EventPlaneSpec("tcp://h:0")
    assert discovery_spec(PlaneConfig(discovery_path="/d")) == DiscoverySpec("/d", "lightspeed", 10.0)
