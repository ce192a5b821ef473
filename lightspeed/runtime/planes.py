"""Build discovery and event-plane objects from a `PlaneConfig`."""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from pathlib import Path

from lightspeed.config import PlaneConfig
from lightspeed.runtime import discovery_etcd, event_plane_nats  # noqa: F401 (they register their backends)
from lightspeed.runtime.cluster_auth import ClusterKey
from lightspeed.runtime.discovery import Discovery, DiscoverySpec, build_discovery
from lightspeed.runtime.event_plane import (
    EventPlaneSpec,
    Publisher,
    Subscriber,
    build_publisher,
    build_subscriber,
)
from lightspeed.runtime.signed_discovery import SignedDiscovery

log = logging.getLogger(__name__)
_WILDCARDS = ("", "0.0.0.0", "::", "[::]")


def default_discovery_path(namespace: str) -> Path:
    base = os.environ.get("LIGHTSPEED_STATE_DIR") or os.path.join(Path.home(), ".cache", "lightspeed")
    return Path(base) / "discovery" / namespace


def cluster_key(cfg: PlaneConfig) -> ClusterKey | None:
    """The keys of the fleet's cluster secret (None: planes open)."""
    return ClusterKey.from_secret(cfg.cluster_secret) if cfg.cluster_secret else None


def discovery_from_config(cfg: PlaneConfig) -> Discovery:
    inner = build_discovery(cfg.discovery, discovery_spec(cfg))
    key = cluster_key(cfg)
    return SignedDiscovery(inner, key) if key is not None else inner


def discovery_spec(cfg: PlaneConfig) -> DiscoverySpec:
    """etcd reads its endpoints (and credentials) where the file backend reads its folder."""
    if cfg.discovery == "etcd":
        return DiscoverySpec(
            cfg.etcd_endpoints,
            cfg.namespace,
            cfg.discovery_ttl,
            cfg.etcd_user,
            cfg.etcd_password,
            cfg.etcd_ca,
            cfg.etcd_cert,
            cfg.etcd_key,
        )
    path = cfg.discovery_path or str(default_discovery_path(cfg.namespace))
    return DiscoverySpec(path=path, name=cfg.namespace, ttl=cfg.discovery_ttl)


def event_plane_spec(cfg: PlaneConfig, bind: str | None = None) -> EventPlaneSpec:
    """zmq binds `bind`; NATS reads its servers, credentials and stream limits."""
    if cfg.event_plane != "nats":
        key = cluster_key(cfg)
        return EventPlaneSpec(bind, curve_secret=key.events if key is not None else None)
    return EventPlaneSpec(
        cfg.nats_url,
        namespace=cfg.namespace,
        user=cfg.nats_user,
        password=cfg.nats_password,
        creds_file=cfg.nats_creds,
        ca_file=cfg.nats_ca,
        cert_file=cfg.nats_cert,
        key_file=cfg.nats_key,
        stream_max_msgs=cfg.nats_kv_max_msgs,
        stream_max_age=cfg.nats_kv_max_age,
    )


def warn_if_open(what: str, host: str, cfg: PlaneConfig) -> None:
    """An internal plane on a non-loopback address with no cluster secret: anyone who can reach
    the address may call it (prompts, KV events, request ids). Say so loudly."""
    if cfg.cluster_secret or _is_loopback(host):
        return
    log.warning(
        "SECURITY: the %s listens on %s WITHOUT a cluster secret: anyone who can reach it can use it; "
        "set --cluster-secret (or LIGHTSPEED_CLUSTER_SECRET) on every process of the fleet",
        what,
        host or "all interfaces",
    )


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def publisher_from_config(cfg: PlaneConfig, host: str, advertise: str = "") -> Publisher:
    if cfg.event_plane != "nats":  # a brokered plane listens on nothing of ours
        warn_if_open("event-plane publisher", host, cfg)
    publisher = build_publisher(cfg.event_plane, event_plane_spec(cfg, f"tcp://{host}:0"))
    dial = advertised(publisher.address, advertise_host(host, advertise))
    return publisher if dial == publisher.address else AdvertisedPublisher(publisher, dial)


def subscriber_from_config(cfg: PlaneConfig, topics: list[str]) -> Subscriber:
    return build_subscriber(cfg.event_plane, topics, event_plane_spec(cfg))


def advertise_host(bind_host: str, advertise: str = "") -> str:
    """The host peers dial: `advertise` if given, else the bind address unless it is a wildcard
    (0.0.0.0 names no machine), then this host's name resolved."""
    if advertise:
        return advertise
    if bind_host not in _WILDCARDS:
        return bind_host
    try:
        guess = socket.gethostbyname(socket.gethostname())
    except OSError:
        guess = "127.0.0.1"
    log.warning("listening on %r without --advertise-host: advertising %s", bind_host, guess)
    return guess


def advertised(address: str, host: str) -> str:
    """`address` ("host:port" or "tcp://host:port") with its host replaced by `host`; other
    addresses (a NATS publisher's subject) are no dial target and stay as they are."""
    scheme, sep, rest = address.rpartition("://")
    if scheme not in ("", "tcp") or ":" not in rest:
        return address
    port = rest.rpartition(":")[2]
    dial_host = f"[{host}]" if ":" in host else host
    return f"{scheme}{sep}{dial_host}:{port}"


class AdvertisedPublisher(Publisher):
    """A publisher bound to a wildcard or private address, announced under the one peers dial."""

    def __init__(self, inner: Publisher, address: str) -> None:
        self.inner = inner
        self._address = address

    @property
    def address(self) -> str:
        return self._address

    def publish(self, topic: str, payload: bytes) -> None:
        self.inner.publish(topic, payload)

    def close(self) -> None:
        self.inner.close()
