"""Discovery on etcd: worker cards under a lease, frontends watch a prefix.

Client library: `aetcd` (asyncio gRPC on etcd's v3 API), chosen over `etcd3gw` after running both
against etcd 3.4 (Debian `etcd-server`): both do leases, keep-alive and prefix watches, but
etcd3gw speaks to the JSON gateway with blocking `requests` calls (a thread per call and per
watch inside our event loops) and has no user/password authentication, while aetcd is native
asyncio, authenticates, and is maintained (1.0.0 in 2025, current grpcio/protobuf). aetcd opens
only plaintext channels, so `_Client` below opens the same channel with TLS credentials when a
CA or client certificate is configured (or the endpoint is https://).

Layout: `/lightspeed/<namespace>/cards/<instance_id>` -> the card as msgspec JSON, attached to
the registering process's lease. The lease (TTL = spec.ttl, at least etcd's minimum) is kept
alive every ttl/3 seconds; when a keep-alive finds the lease gone (it expired while etcd was
unreachable, or etcd came back on an empty data dir) a new lease is granted and every owned
card put again. A SIGKILLed process stops its keep-alives, so its cards vanish when the lease
expires.

Watchers list the prefix at revision R, then watch from R+1. When the watch breaks (etcd restart,
compaction, lost connection) they list again and emit the difference against what they have
reported, so a consumer never keeps a card that was deleted while the watch was down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import msgspec

from lightspeed.protocol import WorkerCard
from lightspeed.runtime.discovery import Discovery, DiscoveryEvent, DiscoverySpec, register_backend

log = logging.getLogger(__name__)
_T = TypeVar("_T")

RPC_TIMEOUT_S = 5.0  # one etcd call; a dead endpoint fails over instead of hanging a caller
RETRY_S = 0.5  # pause after a failed call before the next try (on the next endpoint)
MIN_LEASE_TTL = 2  # etcd refuses shorter leases (1.5 x its election timeout, rounded up)
# gRPC pings find a silently dead connection (a cut link sends no RST); etcd refuses pings more
# often than every 5 s, so stay above that. gRPC backs off reconnects exponentially up to 2 min,
# and channels to one address share that state: cap it, so a restarted etcd is seen in seconds.
_CHANNEL_OPTIONS = {
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
    "grpc.keepalive_permit_without_calls": 1,
    "grpc.initial_reconnect_backoff_ms": 250,
    "grpc.min_reconnect_backoff_ms": 250,
    "grpc.max_reconnect_backoff_ms": 1_000,
    "grpc.use_local_subchannel_pool": 1,
}

_encode = msgspec.json.Encoder().encode
_decode_card = msgspec.json.Decoder(WorkerCard).decode


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int
    tls: bool


def parse_endpoints(raw: str) -> list[Endpoint]:
    """`http://h:2379,https://h2:2379` (a bare `h:2379` is http) -> endpoints, in order."""
    endpoints = []
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        url = urlsplit(item if "://" in item else f"http://{item}")
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"etcd_endpoints: {item!r} is not an http(s)://host:port URL")
        try:
            port = url.port or 2379
        except ValueError:
            raise ValueError(f"etcd_endpoints: bad port in {item!r}") from None
        endpoints.append(Endpoint(url.hostname, port, url.scheme == "https"))
    if not endpoints:
        raise ValueError("etcd_endpoints: give at least one URL")
    return endpoints


def _client_errors() -> tuple[type[BaseException], ...]:
    import aetcd.exceptions

    return (aetcd.exceptions.ClientError, OSError, TimeoutError)


def _read(path: str) -> bytes | None:
    return Path(path).read_bytes() if path else None


def _make_client(endpoint: Endpoint, spec: DiscoverySpec) -> Any:
    """An aetcd client for `endpoint`; with TLS when configured (aetcd itself has no TLS option)."""
    import aetcd
    import grpc

    tls = endpoint.tls or bool(spec.ca_file or spec.cert_file)
    credentials = None
    if tls:
        credentials = grpc.ssl_channel_credentials(_read(spec.ca_file), _read(spec.key_file), _read(spec.cert_file))

    class _Client(aetcd.Client):  # type: ignore[misc]
        async def connect(self) -> None:
            if credentials is None or self._connected.is_set():
                await super().connect()
                return
            # aetcd builds its stubs on whatever `rpc.insecure_channel` returns; it calls it before
            # its first await, so a one-shot swap that restores itself affects no other client.
            rpc = aetcd.client.rpc
            original = rpc.insecure_channel

            def secure_once(target: str, options: Any) -> Any:
                rpc.insecure_channel = original
                return grpc.aio.secure_channel(target, credentials, options=options)

            rpc.insecure_channel = secure_once
            try:
                await super().connect()
            finally:
                rpc.insecure_channel = original

    return _Client(
        host=endpoint.host,
        port=endpoint.port,
        username=spec.user or None,
        password=spec.password or None,
        timeout=RPC_TIMEOUT_S,
        options=dict(_CHANNEL_OPTIONS),
    )


class _Connection:
    """One client at a time, on the current endpoint; `failover` moves to the next one."""

    def __init__(self, spec: DiscoverySpec) -> None:
        self._spec = spec
        self._endpoints = parse_endpoints(spec.path or "")
        self._index = 0
        self._client: Any = None

    @property
    def endpoint(self) -> Endpoint:
        return self._endpoints[self._index]

    async def client(self) -> Any:
        if self._client is None:
            self._client = _make_client(self.endpoint, self._spec)
        await self._client.connect()
        return self._client

    async def call(self, op: Callable[[Any], Awaitable[_T]]) -> _T:
        """Run `op(client)`; a connection-level failure fails over before it propagates."""
        try:
            return await op(await self.client())
        except _client_errors():
            await self.failover()
            raise

    async def failover(self) -> None:
        old, self._client = self._client, None
        self._index = (self._index + 1) % len(self._endpoints)
        if old is not None:
            with contextlib.suppress(Exception):
                await old.close()

    async def close(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.close()
            self._client = None


def _prefix(namespace: str) -> bytes:
    return f"/lightspeed/{namespace}/cards/".encode()


class EtcdDiscovery(Discovery):
    """Cards under `/lightspeed/<namespace>/cards/`, each attached to its registrant's lease."""

    def __init__(self, spec: DiscoverySpec) -> None:
        self.ttl = max(MIN_LEASE_TTL, math.ceil(spec.ttl))
        self.prefix = _prefix(spec.name)
        self._spec = spec
        self._conn = _Connection(spec)
        self._owned: dict[str, WorkerCard] = {}
        self._lease: Any = None
        self._lock = asyncio.Lock()
        self._keeper: asyncio.Task[None] | None = None
        self.leases_granted = 0  # a new lease after the first one means a re-registration

    def _key(self, instance_id: str) -> bytes:
        return self.prefix + instance_id.encode()

    # ------------------------------------------------------------ registration

    async def register(self, card: WorkerCard) -> None:
        self._owned[card.instance_id] = card
        async with self._lock:
            try:
                if self._lease is None:
                    await self._new_lease()
                else:
                    await self._put(card)
            except _client_errors() as err:
                # The keeper re-registers everything once etcd answers again.
                log.warning("etcd: registering %s failed (%s); will retry", card.instance_id, err)
                self._lease = None
        if self._keeper is None or self._keeper.done():
            self._keeper = asyncio.create_task(self._keep_alive(), name="etcd-lease-keepalive")

    async def _put(self, card: WorkerCard, lease: Any = None) -> None:
        lease = lease if lease is not None else self._lease
        await self._conn.call(lambda c: c.put(self._key(card.instance_id), _encode(card), lease=lease))

    async def _new_lease(self) -> None:
        """Grant a lease and put every owned card under it (called with the lock held). The
        lease is kept only once every card is under it: after a failed put the keeper starts over
        (the half-used lease expires unrefreshed)."""
        self._lease = None
        lease = await self._conn.call(lambda c: c.lease(self.ttl))
        self.leases_granted += 1
        for card in list(self._owned.values()):
            await self._put(card, lease)
        self._lease = lease
        log.info("etcd: lease %x (ttl %ds) holds %d card(s)", lease.id, self.ttl, len(self._owned))

    async def _keep_alive(self) -> None:
        while self._owned:
            await asyncio.sleep(self.ttl / 3 if self._lease is not None else RETRY_S)
            async with self._lock:
                try:
                    if self._lease is None or not await self._refresh():
                        await self._new_lease()
                except _client_errors() as err:
                    log.warning("etcd keep-alive via %s failed: %s", self._conn.endpoint, err)

    async def _refresh(self) -> bool:
        """Keep the lease alive; False when etcd no longer knows it (expired or etcd was reset)."""
        lease = self._lease
        reply = await self._conn.call(lambda c: c.refresh_lease(lease.id))
        if reply is None or reply.TTL <= 0:
            log.warning("etcd: lease %x is gone; re-registering %d card(s)", lease.id, len(self._owned))
            return False
        return True

    async def deregister(self, instance_id: str) -> None:
        if self._owned.pop(instance_id, None) is None:
            return
        try:
            await self._conn.call(lambda c: c.delete(self._key(instance_id)))
        except _client_errors() as err:
            log.warning("etcd: deregistering %s failed (%s); its lease will expire", instance_id, err)

    async def close(self) -> None:
        self._owned.clear()
        if self._keeper is not None:
            self._keeper.cancel()
            await asyncio.gather(self._keeper, return_exceptions=True)
            self._keeper = None
        if self._lease is not None:
            lease, self._lease = self._lease, None
            try:  # revoking deletes every card under the lease at once
                await self._conn.call(lambda c: c.revoke_lease(lease.id))
            except _client_errors() as err:
                log.warning("etcd: revoking lease failed (%s); it expires in %ds", err, self.ttl)
        await self._conn.close()

    # ------------------------------------------------------------ reading

    async def _snapshot(self) -> tuple[int, dict[str, WorkerCard]]:
        """(revision, cards) of the prefix as one consistent read."""
        result = await self._conn.call(lambda c: c.get_prefix(self.prefix))
        cards = {}
        for kv in result:
            card = self._decode(kv.key, kv.value)
            if card is not None:
                cards[card.instance_id] = card
        return result.header.revision, cards

    def _decode(self, key: bytes, value: bytes) -> WorkerCard | None:
        try:
            return _decode_card(value)
        except msgspec.DecodeError as err:
            log.warning("etcd: ignoring undecodable card at %r: %s", key, err)
            return None

    async def list_cards(self) -> list[WorkerCard]:
        _, cards = await self._snapshot()
        return sorted(cards.values(), key=lambda c: c.instance_id)

    async def watch(self) -> AsyncGenerator[DiscoveryEvent, None]:
        reported: dict[str, WorkerCard] = {}
        while True:
            try:
                revision, cards = await self._snapshot()
            except _client_errors() as err:
                log.warning("etcd: listing %r failed (%s); retrying", self.prefix, err)
                await asyncio.sleep(RETRY_S)
                continue
            for event in _diff(reported, cards):
                yield event
            async for event in self._follow(revision + 1, reported):
                yield event
            await asyncio.sleep(RETRY_S)

    async def _follow(self, start: int, reported: dict[str, WorkerCard]) -> AsyncGenerator[DiscoveryEvent, None]:
        """Events from `start` on, until the watch breaks (the caller then lists again)."""
        try:
            watch = await self._conn.call(lambda c: c.watch_prefix(self.prefix, start_revision=start))
        except _client_errors() as err:
            log.warning("etcd: watch on %r failed to start: %s", self.prefix, err)
            return
        try:
            async for raw in watch:
                event = self._event(raw, reported)
                if event is not None:
                    yield event
        except _client_errors() as err:
            log.warning("etcd: watch on %r broke (%s); listing again", self.prefix, err)
            await self._conn.failover()
        finally:
            with contextlib.suppress(Exception):
                await watch.cancel()

    def _event(self, raw: Any, reported: dict[str, WorkerCard]) -> DiscoveryEvent | None:
        instance_id = raw.kv.key[len(self.prefix) :].decode(errors="replace")
        if raw.kind == "DELETE":
            if reported.pop(instance_id, None) is None:
                return None
            return DiscoveryEvent("delete", instance_id)
        card = self._decode(raw.kv.key, raw.kv.value)
        if card is None or reported.get(card.instance_id) == card:
            return None
        reported[card.instance_id] = card
        return DiscoveryEvent("put", card.instance_id, card)


def _diff(reported: dict[str, WorkerCard], cards: dict[str, WorkerCard]) -> list[DiscoveryEvent]:
    """Events that turn `reported` into `cards` (and update `reported` to match)."""
    events = [DiscoveryEvent("delete", iid) for iid in sorted(reported) if iid not in cards]
    for iid in sorted(cards):
        if reported.get(iid) != cards[iid]:
            events.append(DiscoveryEvent("put", iid, cards[iid]))
    reported.clear()
    reported.update(cards)
    return events


def _make_etcd(spec: DiscoverySpec) -> Discovery:
    parse_endpoints(spec.path or "")  # a bad URL fails at start, not at the first call
    return EtcdDiscovery(spec)


register_backend("etcd", _make_etcd)
