"""Service discovery: workers register a `WorkerCard`; frontends list and watch them.

Backends share one contract (`Discovery`) so callers never know which is in use:
- `mem`: in-process registry shared by name, for single-process tests and `replay`.
- `file`: one msgspec-JSON file per instance in a shared folder; liveness by file mtime, which a
  heartbeat refreshes, so a crashed worker's entry expires after `ttl` (the file-system analogue of
  an etcd lease). It needs no server, which is what the embedded `lightspeed serve` wants.
New backends plug into `make_discovery` via `register_backend`: etcd (leases) lives in
discovery_etcd.py and registers itself when imported (runtime/planes.py imports it).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import getpass
import logging
import os
import tempfile
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import quote

import msgspec

from lightspeed.protocol import WorkerCard

log = logging.getLogger(__name__)


class DiscoveryEvent(msgspec.Struct, frozen=True):
    """A change in the registry. `card` is None for deletes."""

    kind: Literal["put", "delete"]
    instance_id: str
    card: WorkerCard | None = None


def _put(card: WorkerCard) -> DiscoveryEvent:
    return DiscoveryEvent("put", card.instance_id, card)


def _delete(instance_id: str) -> DiscoveryEvent:
    return DiscoveryEvent("delete", instance_id)


class Discovery(abc.ABC):
    """Registry of live workers, keyed by `WorkerCard.instance_id`."""

    @abc.abstractmethod
    async def register(self, card: WorkerCard) -> None:
        """Add or replace a card; keeps it alive (heartbeat/lease) until deregistered."""

    @abc.abstractmethod
    async def deregister(self, instance_id: str) -> None:
        """Remove a card this object registered (no-op if unknown)."""

    @abc.abstractmethod
    async def list_cards(self) -> list[WorkerCard]:
        """Live cards, sorted by instance_id."""

    @abc.abstractmethod
    def watch(self) -> AsyncGenerator[DiscoveryEvent, None]:
        """A put for every live card, then puts/deletes as the registry changes.

        An async generator, so a caller that stops early can `aclose()` it to unsubscribe."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Deregister everything this object registered and stop its background work."""


# ==================================================================== mem


class _MemRegistry:
    """One shared registry; watchers get events pushed into their own queues."""

    def __init__(self) -> None:
        self.cards: dict[str, WorkerCard] = {}
        self.watchers: set[asyncio.Queue[DiscoveryEvent]] = set()

    def publish(self, event: DiscoveryEvent) -> None:
        for queue in self.watchers:
            queue.put_nowait(event)


_MEM_REGISTRIES: dict[str, _MemRegistry] = {}


class MemDiscovery(Discovery):
    """In-process discovery; every MemDiscovery with the same `name` sees the same registry."""

    def __init__(self, name: str = "default") -> None:
        self._registry = _MEM_REGISTRIES.setdefault(name, _MemRegistry())
        self._owned: set[str] = set()

    async def register(self, card: WorkerCard) -> None:
        self._owned.add(card.instance_id)
        if self._registry.cards.get(card.instance_id) != card:
            self._registry.cards[card.instance_id] = card
            self._registry.publish(_put(card))

    async def deregister(self, instance_id: str) -> None:
        self._owned.discard(instance_id)
        if self._registry.cards.pop(instance_id, None) is not None:
            self._registry.publish(_delete(instance_id))

    async def list_cards(self) -> list[WorkerCard]:
        return sorted(self._registry.cards.values(), key=lambda c: c.instance_id)

    async def watch(self) -> AsyncGenerator[DiscoveryEvent, None]:
        queue: asyncio.Queue[DiscoveryEvent] = asyncio.Queue()
        # Subscribe and snapshot with no await in between, so no change can fall in the gap;
        # a change queued while the snapshot is yielded is replayed after it (puts are idempotent).
        self._registry.watchers.add(queue)
        snapshot = sorted(self._registry.cards.values(), key=lambda c: c.instance_id)
        try:
            for card in snapshot:
                yield _put(card)
            while True:
                yield await queue.get()
        finally:
            self._registry.watchers.discard(queue)

    async def close(self) -> None:
        for instance_id in list(self._owned):
            await self.deregister(instance_id)


# ==================================================================== file

_SUFFIX = ".json"
_encoder = msgspec.json.Encoder()
_card_decoder = msgspec.json.Decoder(WorkerCard)


@dataclass(frozen=True, slots=True)
class _Entry:
    """What a scan knows about one file; `key` changes only when the file is rewritten."""

    key: tuple[int, int]  # (inode, size): a touch keeps both, an atomic rewrite changes the inode
    card: WorkerCard


def _file_name(instance_id: str) -> str:
    # Percent-encoding is injective, so distinct ids never share a file; "." stays literal but
    # temp files are told apart by their suffix, not a leading dot.
    return quote(instance_id, safe="") + _SUFFIX


def write_atomic(path: Path, data: bytes) -> None:
    """Readers see the old file or the new one, never a partial write."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class _DirScanner:
    """Diffs the directory against the previous scan; drops (and deletes) expired files."""

    def __init__(self, root: Path, ttl: float) -> None:
        self._root = root
        self._ttl = ttl
        self.entries: dict[str, _Entry] = {}  # file name -> entry

    def scan(self) -> list[DiscoveryEvent]:
        seen: dict[str, _Entry] = {}
        events: list[DiscoveryEvent] = []
        now = time.time()
        for dirent in self._live_files(now):
            entry = self._read(dirent)
            if entry is None:
                continue
            seen[dirent.name] = entry
            old = self.entries.get(dirent.name)
            if old is None or old.card != entry.card:
                if old is not None and old.card.instance_id != entry.card.instance_id:
                    events.append(_delete(old.card.instance_id))
                events.append(_put(entry.card))
        for name, old in self.entries.items():
            if name not in seen:
                events.append(_delete(old.card.instance_id))
        self.entries = seen
        return events

    def _live_files(self, now: float) -> list[os.DirEntry[str]]:
        live = []
        try:
            dirents = list(os.scandir(self._root))
        except FileNotFoundError:
            return []
        for dirent in dirents:
            if not dirent.name.endswith(_SUFFIX) or dirent.name.startswith("."):
                continue
            try:
                mtime = dirent.stat().st_mtime
            except FileNotFoundError:
                continue
            if now - mtime > self._ttl:
                self._expire(Path(dirent.path), now)
            else:
                live.append(dirent)
        return live

    def _expire(self, path: Path, now: float) -> None:
        # Re-check right before unlinking: the owner may have just heartbeated. A lost race only
        # costs a brief delete/put flap, since the owner re-creates a missing file.
        with contextlib.suppress(FileNotFoundError):
            if now - path.stat().st_mtime > self._ttl:
                path.unlink()
                log.info("expired stale discovery entry %s", path.name)

    def _read(self, dirent: os.DirEntry[str]) -> _Entry | None:
        try:
            st = dirent.stat()
            key = (st.st_ino, st.st_size)
            old = self.entries.get(dirent.name)
            if old is not None and old.key == key:
                return old  # only touched by a heartbeat: skip the read and decode
            return _Entry(key, _card_decoder.decode(Path(dirent.path).read_bytes()))
        except FileNotFoundError:
            return None
        except (OSError, msgspec.DecodeError) as exc:
            log.warning("ignoring unreadable discovery entry %s: %s", dirent.name, exc)
            return None


def remove_entries_of(root: Path | str, pid: int) -> list[str]:
    """Delete the entries that process `pid` registered (by the pid on their cards); returns
    their instance ids. For a supervisor that saw the process die: watchers drop the entries
    at their next scan instead of when the TTL runs out. Only for a folder whose registrants
    all run on this host, since a pid means nothing on another one."""
    removed = []
    for instance_id, path in _entries_by_pid(Path(root), pid):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(instance_id)
            log.info("removed discovery entry of %s (its process %d exited)", instance_id, pid)
    return removed


def _entries_by_pid(root: Path, pid: int) -> list[tuple[str, Path]]:
    try:
        dirents = list(os.scandir(root))
    except FileNotFoundError:
        return []
    found = []
    for dirent in dirents:
        if not dirent.name.endswith(_SUFFIX) or dirent.name.startswith("."):
            continue
        try:
            card = _card_decoder.decode(Path(dirent.path).read_bytes())
        except (OSError, msgspec.DecodeError):
            continue  # gone meanwhile, or not a card: not ours to judge
        if card.pid == pid:
            found.append((card.instance_id, Path(dirent.path)))
    return found


class FileDiscovery(Discovery):
    """Discovery through a shared folder: one file per instance, mtime as heartbeat.

    The directory is small (one file per worker) and a scan is a listing plus stats, so scans
    run inline on the event loop instead of in a thread.
    """

    def __init__(
        self,
        root: Path | str,
        ttl: float = 10.0,
        heartbeat_interval: float = 2.0,
        poll_interval: float = 0.25,
    ) -> None:
        for name, value in (
            ("ttl", ttl),
            ("heartbeat_interval", heartbeat_interval),
            ("poll_interval", poll_interval),
        ):
            if value <= 0:
                raise ValueError(f"{name} must be > 0; got {value}")
        if heartbeat_interval >= ttl:
            raise ValueError(f"heartbeat_interval ({heartbeat_interval}) must be < ttl ({ttl})")
        self.root = Path(root)
        self.ttl = ttl
        self.heartbeat_interval = heartbeat_interval
        self.poll_interval = poll_interval
        self._owned: dict[str, WorkerCard] = {}
        self._heartbeat: asyncio.Task[None] | None = None

    def _path(self, instance_id: str) -> Path:
        return self.root / _file_name(instance_id)

    async def register(self, card: WorkerCard) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_atomic(self._path(card.instance_id), _encoder.encode(card))
        self._owned[card.instance_id] = card
        if self._heartbeat is None or self._heartbeat.done():
            self._heartbeat = asyncio.create_task(self._beat(), name="discovery-heartbeat")

    async def deregister(self, instance_id: str) -> None:
        if self._owned.pop(instance_id, None) is not None:
            with contextlib.suppress(FileNotFoundError):
                self._path(instance_id).unlink()

    async def list_cards(self) -> list[WorkerCard]:
        scanner = _DirScanner(self.root, self.ttl)
        scanner.scan()
        return sorted((e.card for e in scanner.entries.values()), key=lambda c: c.instance_id)

    async def watch(self) -> AsyncGenerator[DiscoveryEvent, None]:
        scanner = _DirScanner(self.root, self.ttl)
        while True:
            for event in scanner.scan():
                yield event
            await asyncio.sleep(self.poll_interval)

    async def _beat(self) -> None:
        while self._owned:
            await asyncio.sleep(self.heartbeat_interval)
            for instance_id, card in list(self._owned.items()):
                self._touch(instance_id, card)

    def _touch(self, instance_id: str, card: WorkerCard) -> None:
        path = self._path(instance_id)
        try:
            os.utime(path)
        except FileNotFoundError:
            # Expired and removed by a watcher (e.g. this process stalled past ttl): come back.
            log.warning("discovery entry for %s vanished; re-registering", instance_id)
            self.root.mkdir(parents=True, exist_ok=True)
            write_atomic(path, _encoder.encode(card))
        except OSError as exc:
            log.warning("heartbeat for %s failed: %s", instance_id, exc)

    async def close(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
            self._heartbeat = None
        for instance_id in list(self._owned):
            await self.deregister(instance_id)


# ==================================================================== registry


def default_discovery_path() -> Path:
    """Per-user folder for the file backend, so two users on one host do not mix fleets."""
    return Path(tempfile.gettempdir()) / f"lightspeed-{getpass.getuser()}" / "discovery"


@dataclass(frozen=True, slots=True)
class DiscoverySpec:
    """Backend-neutral options; each backend reads what it needs (etcd: path = endpoint URLs,
    comma-separated, and the credential/TLS files)."""

    path: str | None = None
    name: str = "default"
    ttl: float = 10.0
    user: str = ""
    password: str = ""
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""

    def __post_init__(self) -> None:
        if self.ttl <= 0:
            raise ValueError(f"ttl must be > 0; got {self.ttl}")


def _make_mem(spec: DiscoverySpec) -> Discovery:
    return MemDiscovery(spec.name)


def _make_file(spec: DiscoverySpec) -> Discovery:
    root = Path(spec.path) if spec.path else default_discovery_path()
    # Heartbeat several times per ttl so one late beat never expires a live worker.
    return FileDiscovery(root, ttl=spec.ttl, heartbeat_interval=spec.ttl / 5)


_BACKENDS: dict[str, Callable[[DiscoverySpec], Discovery]] = {"mem": _make_mem, "file": _make_file}


def register_backend(kind: str, factory: Callable[[DiscoverySpec], Discovery]) -> None:
    """Add a backend (e.g. "etcd") without touching callers of `make_discovery`."""
    _BACKENDS[kind] = factory


def discovery_kinds() -> tuple[str, ...]:
    return tuple(_BACKENDS)


def make_discovery(kind: str, *, path: str | None = None, name: str = "default", ttl: float = 10.0) -> Discovery:
    return build_discovery(kind, DiscoverySpec(path=path, name=name, ttl=ttl))


def build_discovery(kind: str, spec: DiscoverySpec) -> Discovery:
    factory = _BACKENDS.get(kind)
    if factory is None:
        raise ValueError(f"discovery must be one of {', '.join(_BACKENDS)}; got {kind!r}")
    return factory(spec)
