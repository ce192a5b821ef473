"""Event plane (ZMQ): topic filtering, fan-in from several publishers, disconnect."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator

import pytest

from lightspeed.runtime import event_plane as event_plane_module
from lightspeed.runtime.event_plane import (
    EventPlaneSpec,
    EventPublisher,
    EventSubscriber,
    Publisher,
    Subscriber,
    event_plane_kinds,
    make_publisher,
    make_subscriber,
    register_event_plane,
)

_sync_ids = itertools.count()


async def wait_live(pub: Publisher, sub: Subscriber, topic: str, timeout: float = 5.0) -> None:
    """Beat ZMQ's slow joiner: probe until one arrives, then drain up to a unique marker.

    Probes sent before the subscription reached the publisher are dropped; once one arrives, the
    marker published after it is delivered behind any remaining probes, so draining to the marker
    leaves the subscriber with nothing stale.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        assert loop.time() < deadline, "subscription never became live"
        pub.publish(topic, b"probe")
        try:
            await asyncio.wait_for(sub.recv(), 0.02)
            break
        except TimeoutError:
            continue
    marker = f"marker-{next(_sync_ids)}".encode()
    pub.publish(topic, marker)
    while (await asyncio.wait_for(sub.recv(), timeout))[1] != marker:
        pass


async def assert_quiet(sub: Subscriber, seconds: float = 0.1) -> None:
    with pytest.raises(asyncio.TimeoutError):
        got = await asyncio.wait_for(sub.recv(), seconds)
        pytest.fail(f"unexpected message {got}")


@pytest.fixture
async def pub() -> AsyncIterator[EventPublisher]:
    p = EventPublisher()
    yield p
    p.close()


def test_publisher_reports_bound_address() -> None:
    pub = EventPublisher()
    try:
        assert pub.address.startswith("tcp://127.0.0.1:")
        assert int(pub.address.rsplit(":", 1)[1]) > 0
    finally:
        pub.close()


def test_bad_bind_is_value_error() -> None:
    with pytest.raises(ValueError):
        EventPublisher("bogus://nowhere")


async def test_topic_filtering_is_exact(pub: EventPublisher) -> None:
    sub = EventSubscriber(["kv-events"])
    sub.connect(pub.address)
    try:
        await wait_live(pub, sub, "kv-events")
        pub.publish("load-metrics", b"m0")
        pub.publish("kv-events-extra", b"lookalike")  # shares the prefix, must not match
        pub.publish("kv-events", b"e1")
        pub.publish("kv-events", b"e2")
        assert await asyncio.wait_for(sub.recv(), 2.0) == ("kv-events", b"e1")
        assert await asyncio.wait_for(sub.recv(), 2.0) == ("kv-events", b"e2")
        await assert_quiet(sub)
    finally:
        sub.close()


async def test_empty_topic_list_receives_everything(pub: EventPublisher) -> None:
    sub = EventSubscriber([])
    sub.connect(pub.address)
    try:
        await wait_live(pub, sub, "any")
        pub.publish("a", b"1")
        pub.publish("b", b"2")
        got = [await asyncio.wait_for(sub.recv(), 2.0) for _ in range(2)]
        assert got == [("a", b"1"), ("b", b"2")]
    finally:
        sub.close()


async def test_async_iteration(pub: EventPublisher) -> None:
    sub = EventSubscriber(["t"])
    sub.connect(pub.address)
    try:
        await wait_live(pub, sub, "t")
        for i in range(3):
            pub.publish("t", bytes([i]))
        got = []
        async for message in sub:
            got.append(message)
            if len(got) == 3:
                break
        assert got == [("t", b"\x00"), ("t", b"\x01"), ("t", b"\x02")]
    finally:
        sub.close()


async def test_multiple_publishers_fan_in() -> None:
    pubs = [EventPublisher(), EventPublisher()]
    sub = EventSubscriber(["kv-events"])
    try:
        for p in pubs:
            sub.connect(p.address)
            sub.connect(p.address)  # idempotent
        for p in pubs:
            await wait_live(p, sub, "kv-events")
        for i in range(5):
            for n, p in enumerate(pubs):
                p.publish("kv-events", f"{n}:{i}".encode())
        got = [(await asyncio.wait_for(sub.recv(), 2.0))[1].decode() for _ in range(10)]
        # Fair-queued across publishers; each publisher's own order is kept.
        for n in range(2):
            assert [g for g in got if g.startswith(f"{n}:")] == [f"{n}:{i}" for i in range(5)]
        assert sub.connected == frozenset(p.address for p in pubs)
        await assert_quiet(sub)
    finally:
        sub.close()
        for p in pubs:
            p.close()


async def test_disconnect_stops_delivery() -> None:
    gone, kept = EventPublisher(), EventPublisher()
    sub = EventSubscriber(["t"])
    try:
        sub.connect(gone.address)
        sub.connect(kept.address)
        await wait_live(gone, sub, "t")
        await wait_live(kept, sub, "t")
        sub.disconnect(gone.address)
        # zmq_disconnect stops reads from that publisher's pipe at once; no settling needed.
        gone.publish("t", b"from-gone")
        kept.publish("t", b"from-kept")
        assert await asyncio.wait_for(sub.recv(), 2.0) == ("t", b"from-kept")
        await assert_quiet(sub)
        assert sub.connected == frozenset({kept.address})
    finally:
        sub.close()
        gone.close()
        kept.close()


# ---------------------------------------------------------------- registry


def test_make_publisher_and_subscriber_zmq() -> None:
    assert "zmq" in event_plane_kinds()
    pub = make_publisher("zmq")
    sub = make_subscriber("zmq", ["kv-events"])
    try:
        assert isinstance(pub, EventPublisher)
        assert isinstance(sub, EventSubscriber)
    finally:
        pub.close()
        sub.close()
    with pytest.raises(ValueError):
        make_publisher("kafka")
    with pytest.raises(ValueError):
        make_subscriber("kafka", [])
    with pytest.raises(ValueError):
        EventSubscriber([], hwm=0)


def test_register_event_plane(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(event_plane_module, "_BACKENDS", dict(event_plane_module._BACKENDS))
    specs: list[EventPlaneSpec] = []

    def publisher(spec: EventPlaneSpec) -> Publisher:
        specs.append(spec)
        return EventPublisher()

    def subscriber(topics: list[str], spec: EventPlaneSpec) -> Subscriber:
        specs.append(spec)
        return EventSubscriber(topics)

    register_event_plane("test-bus", publisher, subscriber)
    pub = make_publisher("test-bus", address="nats://127.0.0.1:4222")
    sub = make_subscriber("test-bus", ["x"], address="nats://127.0.0.1:4222")
    pub.close()
    sub.close()
    assert specs == [EventPlaneSpec("nats://127.0.0.1:4222")] * 2
