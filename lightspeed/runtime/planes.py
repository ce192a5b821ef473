"""Build discovery and event-plane objects from a `PlaneConfig`."""

from __future__ import annotations

import os
from pathlib import Path

from lightspeed.config import PlaneConfig
from lightspeed.runtime.discovery import Discovery, make_discovery
from lightspeed.runtime.event_plane import (
    Publisher,
    Subscriber,
    make_publisher,
    make_subscriber,
)


def default_discovery_path(namespace: str) -> Path:
    base = os.environ.get("LIGHTSPEED_STATE_DIR") or os.path.join(Path.home(), ".cache", "lightspeed")
    return Path(base) / "discovery" / namespace


def discovery_from_config(cfg: PlaneConfig) -> Discovery:
    path = cfg.discovery_path or str(default_discovery_path(cfg.namespace))
    return make_discovery(cfg.discovery, path=path, name=cfg.namespace, ttl=cfg.discovery_ttl)


def publisher_from_config(cfg: PlaneConfig, host: str) -> Publisher:
    return make_publisher(cfg.event_plane, address=f"tcp://{host}:0")


def subscriber_from_config(cfg: PlaneConfig, topics: list[str]) -> Subscriber:
    return make_subscriber(cfg.event_plane, topics=topics)
