"""NATS event plane against a real nats-server -js on 127.0.0.1: plain topics, KV events replayed
from JetStream into a real router feed (KvEventFeed + KvIndex), dump fallback after trimming, and
resumption across a NATS restart."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import msgspec
import pytest

from lightspeed.config import PlaneConfig
from lightspeed.protocol import (
    TOPIC_KV_EVENTS,
    TOPIC_LOAD_METRICS,
    KvCleared,
    KvEvent,
    KvStored,
    StoredBlock,
    WorkerCard,
)
from lightspeed.router.active import ActiveLoad
from lightspeed.router.indexer import KvIndex
from lightspeed.router.kv_events import KvEventFeed
from lightspeed.router.replica_sync import TOPIC_ROUTER_SYNC, ReplicaSync
from lightspeed.runtime import event_plane_nats
from lightspeed.runtime.discovery import MemDiscovery
from lightspeed.runtime.event_plane import EventPlaneSpec, build_publisher, build_subscriber
from lightspeed.runtime.event_plane_nats import NatsPublisher, NatsSubscriber, servers_of
from lightspeed.runtime.planes import event_plane_spec
from tests.integration.cluster_servers import (  # noqa: F401 (fixture)
    NatsServer,
    make_certs,
    nats_server,
    require_binary,
)

_encode = msgspec.msgpack.Encoder().encode
WID = "mocker-w1"


def spec(server: NatsServer, **kw: int) -> EventPlaneSpec:
    return EventPlaneSpec(server.url, namespace="t", **kw)  # type: ignore[arg-type]


def stored(event_id: int) -> KvEvent:
    return KvEvent(WID, event_id, KvStored([StoredBlock(1000 + event_id, event_id)]))


class DumpingClient:
    """The worker side of `kv_dump`: answers with Cleared + the blocks of events 1..`upto`."""

    def __init__(self, upto: Callable[[], int]) -> None:
        self.upto = upto
        self.dumps = 0

    async def stream(self, address: str, endpoint: str, payload: bytes) -> AsyncIterator[bytes]:
        assert endpoint == "kv_dump"
        self.dumps += 1
        last = self.upto()
        frames = [KvEvent(WID, last, KvCleared())] + [KvEvent(WID, last, stored(i).data) for i in range(1, last + 1)]

        async def gen() -> AsyncIterator[bytes]:
            for frame in frames:
                yield _encode(frame)

        return gen()


class Worker:
    """Publishes numbered KV events the way worker/process.py does."""

    def __init__(self, publisher: NatsPublisher) -> None:
        self.pub = publisher
        self.last = 0
        self.card = WorkerCard(instance_id=WID, model="m", address="w:1", events_address=publisher.address)

    async def emit(self, n: int) -> None:
        for _ in range(n):
            self.last += 1
            self.pub.publish(TOPIC_KV_EVENTS, _encode(stored(self.last)))
        await self.pub.flush()


async def router(server: NatsServer, worker: Worker, **kw: int) -> tuple[KvEventFeed, DumpingClient]:
    client = DumpingClient(lambda: worker.last)
    feed = KvEventFeed(build_subscriber("nats", [TOPIC_KV_EVENTS], spec(server, **kw)), KvIndex(), client)  # type: ignore[arg-type]
    await feed.start()
    feed.worker_added(worker.card)
    return feed, client


async def until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


def _background_tasks() -> set[asyncio.Task[None]]:
    return event_plane_nats._background


def test_validation() -> None:
    with pytest.raises(ValueError, match="nats_url"):
        servers_of(EventPlaneSpec(""))
    with pytest.raises(ValueError, match="nats_url"):
        servers_of(EventPlaneSpec("http://a:1"))
    with pytest.raises(ValueError, match="namespace"):
        servers_of(EventPlaneSpec("nats://a:1", namespace="a.b"))
    with pytest.raises(ValueError, match="nats_url is required"):
        PlaneConfig(event_plane="nats")
    cfg = PlaneConfig(event_plane="nats", nats_url="nats://a:1,nats://b:2", nats_kv_max_msgs=7, namespace="ns")
    got = event_plane_spec(cfg)
    assert (got.address, got.namespace, got.stream_max_msgs) == ("nats://a:1,nats://b:2", "ns", 7)


async def test_plain_topics_reach_connected_subscribers(nats_server: NatsServer) -> None:  # noqa: F811
    pub = build_publisher("nats", spec(nats_server))
    sub = build_subscriber("nats", [TOPIC_LOAD_METRICS], spec(nats_server))
    other = build_publisher("nats", spec(nats_server))  # not connected: never heard
    try:
        assert not sub.keeps_history
        sub.connect(pub.address)
        await sub.retained(pub.address)  # subscribed once this returns
        await asyncio.sleep(0.1)
        other.publish(TOPIC_LOAD_METRICS, b"other")
        pub.publish("unsubscribed-topic", b"x")
        pub.publish(TOPIC_LOAD_METRICS, b"m1")
        assert await asyncio.wait_for(sub.recv(), 5) == (TOPIC_LOAD_METRICS, b"m1")
        sub.disconnect(pub.address)
        await asyncio.sleep(0.2)
        pub.publish(TOPIC_LOAD_METRICS, b"after")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(sub.recv(), 0.5)
    finally:
        for x in (pub, sub, other):
            x.close()


async def test_router_replays_history_instead_of_dumping(nats_server: NatsServer) -> None:  # noqa: F811
    worker = Worker(build_publisher("nats", spec(nats_server)))  # type: ignore[arg-type]
    await worker.emit(5)  # before any router exists
    feed, client = await router(nats_server, worker)
    await until(lambda: feed.index.last_event_id(WID) == 5)
    assert (feed.index.worker_blocks(WID), feed.replayed, client.dumps) == (5, 5, 0)
    await feed.stop()  # the router restarts; the worker keeps publishing meanwhile
    await worker.emit(3)
    feed2, client2 = await router(nats_server, worker)
    await until(lambda: feed2.index.last_event_id(WID) == 8)
    assert (feed2.index.worker_blocks(WID), feed2.replayed, client2.dumps, feed2.resynced) == (8, 8, 0, 0)
    await worker.emit(1)  # and live events follow the replay
    await until(lambda: feed2.index.last_event_id(WID) == 9)
    await feed2.stop()
    worker.pub.close()


async def test_trimmed_stream_falls_back_to_a_dump(nats_server: NatsServer) -> None:  # noqa: F811
    worker = Worker(build_publisher("nats", spec(nats_server, stream_max_msgs=3)))  # type: ignore[arg-type]
    await worker.emit(6)  # the stream keeps events 4..6 only
    feed, client = await router(nats_server, worker, stream_max_msgs=3)
    await until(lambda: feed.resynced == 1)
    # Event 4 came first: a gap after nothing, so the worker was asked for its blocks (1..6).
    assert (client.dumps, feed.index.last_event_id(WID), feed.index.worker_blocks(WID)) == (1, 6, 6)
    await worker.emit(1)
    await until(lambda: feed.index.last_event_id(WID) == 7)
    assert client.dumps == 1
    await feed.stop()
    worker.pub.close()


async def test_worker_without_history_is_dumped(nats_server: NatsServer) -> None:  # noqa: F811
    worker = Worker(build_publisher("nats", spec(nats_server)))  # type: ignore[arg-type]
    feed, client = await router(nats_server, worker)
    await until(lambda: feed.resynced == 1)
    assert (client.dumps, feed.replayed, feed.index.last_event_id(WID)) == (1, 0, 0)
    await worker.emit(2)
    await until(lambda: feed.index.last_event_id(WID) == 2)
    await feed.stop()
    worker.pub.close()


async def test_router_resumes_after_nats_restart(nats_server: NatsServer) -> None:  # noqa: F811
    worker = Worker(build_publisher("nats", spec(nats_server)))  # type: ignore[arg-type]
    await worker.emit(3)
    feed, client = await router(nats_server, worker)
    await until(lambda: feed.index.last_event_id(WID) == 3)
    await asyncio.to_thread(nats_server.restart)  # same store: the stream survives, consumers do not
    await worker.emit(4)  # sent once the publisher has reconnected
    await until(lambda: feed.index.last_event_id(WID) == 7, timeout=20.0)
    assert (feed.index.worker_blocks(WID), client.dumps, feed.resynced) == (7, 0, 0)
    sub = feed._sub
    assert isinstance(sub, NatsSubscriber)
    assert sub.last_stream_seq[worker.pub.publisher_id] == 7
    await feed.stop()
    worker.pub.close()


async def test_router_replicas_share_active_load_over_nats(nats_server: NatsServer) -> None:  # noqa: F811
    discovery = MemDiscovery("nats-replica-sync")
    loads = [ActiveLoad(), ActiveLoad()]
    subs = [build_subscriber("nats", [TOPIC_ROUTER_SYNC], spec(nats_server)) for _ in loads]
    syncs = [
        ReplicaSync(load, build_publisher("nats", spec(nats_server)), sub, discovery, "t")
        for load, sub in zip(loads, subs)
    ]
    for sync in syncs:
        await sync.start()
    syncs[0].peer_added(syncs[1].card)
    syncs[1].peer_added(syncs[0].card)
    await subs[1].retained(syncs[0].card.events_address)  # subscribed once this returns
    loads[0].add("r1", "w1", 100, blocks=3, hashes=[11, 12])
    await until(lambda: loads[1].get("w1").requests == 1)
    assert (loads[1].get("w1").prefill_tokens, loads[1].get("w1").blocks) == (100, 3)
    loads[0].free("r1")
    await until(lambda: loads[1].get("w1").requests == 0)
    assert syncs[1].mirrored == 2 and syncs[0].mirrored == 0
    for sync in syncs:
        await sync.stop()


def custom_server(tmp_path: Path, extra: list[str]) -> NatsServer:
    require_binary("nats-server", "nats-server")
    server = NatsServer(tmp_path / "nats")
    server.extra = extra
    server.start()
    return server


async def replay_one(spec: EventPlaneSpec) -> tuple[str, bytes]:
    pub = build_publisher("nats", spec)
    sub = build_subscriber("nats", [TOPIC_KV_EVENTS], spec)
    try:
        pub.publish(TOPIC_KV_EVENTS, b"e1")
        assert isinstance(pub, NatsPublisher)
        await asyncio.wait_for(pub.flush(), 10)
        sub.connect(pub.address)
        return await asyncio.wait_for(sub.recv(), 10)
    finally:
        pub.close()
        sub.close()


async def test_user_and_password(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    server = custom_server(tmp_path, ["--user", "fleet", "--pass", "s3cret-pass"])
    try:
        good = EventPlaneSpec(server.url, namespace="t", user="fleet", password="s3cret-pass")
        assert await replay_one(good) == (TOPIC_KV_EVENTS, b"e1")
        anonymous = build_subscriber("nats", [TOPIC_LOAD_METRICS], spec(server))
        anonymous.connect("nats://x:4222/abc")
        with pytest.raises(TimeoutError):  # it keeps retrying, and says why
            await asyncio.wait_for(anonymous.retained("nats://x:4222/abc"), 1.5)
        anonymous.close()
        assert "Authorization Violation" in caplog.text
    finally:
        server.kill()


async def test_mutual_tls(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs")
    tls = [
        "--tls",
        "--tlscert",
        certs.server_cert,
        "--tlskey",
        certs.server_key,
        "--tlsverify",
        "--tlscacert",
        certs.ca,
    ]
    server = custom_server(tmp_path, tls)
    try:
        spec_ = EventPlaneSpec(
            server.url, namespace="t", ca_file=certs.ca, cert_file=certs.client_cert, key_file=certs.client_key
        )
        assert await replay_one(spec_) == (TOPIC_KV_EVENTS, b"e1")
    finally:
        server.kill()


async def test_worker_flapping_in_discovery_replays_without_a_dump(nats_server: NatsServer) -> None:  # noqa: F811
    """etcd restarts can show a worker leaving and coming back: its blocks are dropped and then
    replayed from the stream; the old subscription's late messages must not look like a gap."""
    worker = Worker(build_publisher("nats", spec(nats_server)))  # type: ignore[arg-type]
    await worker.emit(3000)
    feed, client = await router(nats_server, worker)
    for _ in range(3):  # each flap in the middle of a replay
        await until(lambda: (feed.index.last_event_id(WID) or 0) > 10)
        feed.worker_removed(WID)
        assert feed.index.worker_blocks(WID) == 0
        feed.worker_added(worker.card)
    await until(lambda: feed.index.last_event_id(WID) == 3000)
    assert (feed.index.worker_blocks(WID), client.dumps, feed.resynced) == (3000, 0, 0)
    await feed.stop()
    worker.pub.close()


async def test_a_closed_publisher_purges_its_kv_history(nats_server: NatsServer) -> None:  # noqa: F811
    kept, closed = (Worker(build_publisher("nats", spec(nats_server))) for _ in range(2))  # type: ignore[arg-type]
    await kept.emit(2)
    await closed.emit(3)
    probe = build_subscriber("nats", [TOPIC_KV_EVENTS], spec(nats_server))
    probe.connect(kept.card.events_address)
    probe.connect(closed.card.events_address)
    assert (await probe.retained(kept.card.events_address), await probe.retained(closed.card.events_address)) == (2, 3)
    closed.pub.close()  # a worker that stops cleanly leaves nothing for routers to replay
    await until(lambda: not closed.pub._session.nc and not _background_tasks())
    assert (await probe.retained(kept.card.events_address), await probe.retained(closed.card.events_address)) == (2, 0)
    probe.close()
    kept.pub.close()
