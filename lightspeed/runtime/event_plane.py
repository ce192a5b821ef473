"""Event plane: fire-and-forget pub/sub for KV events and metrics.

Workers publish `(topic, payload)` messages; routers and planners subscribe to the topics they
need. Delivery is best effort, which the consumers are built for: KV events carry a per-worker
`event_id` so a gap triggers a resync, and metrics are periodic snapshots.

The default backend is ZMQ PUB/SUB with no broker: each worker binds a PUB socket (its address
goes into its `WorkerCard.events_address`) and subscribers connect to every worker they learn of
from discovery. The brokered backend (NATS, event_plane_nats.py, registered via
`register_event_plane` when imported) fits the same contract: `address` names the publisher's
subjects on the server, and its KV events are kept on a stream that `connect` replays.
"""

from __future__ import annotations

import abc
import logging
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
import zmq
import zmq.asyncio
from zmq.utils import z85

log = logging.getLogger(__name__)
T = TypeVar("T")

# ZMQ's default high-water mark (1000 messages) drops KV events in bursts (one large prefill
# stores hundreds of blocks); memory per queued event is small, so allow far more.
DEFAULT_HWM = 100_000


class Publisher(abc.ABC):
    @property
    @abc.abstractmethod
    def address(self) -> str:
        """Where subscribers connect to receive this publisher's messages."""

    @abc.abstractmethod
    def publish(self, topic: str, payload: bytes) -> None:
        """Send without blocking; a message that cannot be queued is dropped and counted."""

    @abc.abstractmethod
    def close(self) -> None: ...


class Subscriber(abc.ABC):
    """Receives messages whose topic equals one of `topics` (all topics when empty)."""

    @abc.abstractmethod
    def connect(self, address: str) -> None: ...

    @abc.abstractmethod
    def disconnect(self, address: str) -> None: ...

    @abc.abstractmethod
    async def recv(self) -> tuple[str, bytes]: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    @property
    def keeps_history(self) -> bool:
        """True when `connect` replays what the publisher sent before (a brokered stream), so a
        consumer need not fetch the publisher's state another way; zmq keeps nothing."""
        return False

    async def retained(self, address: str) -> int:
        """How many past messages of `address` the last `connect` is replaying (0 without history)."""
        return 0

    async def __aiter__(self) -> AsyncIterator[tuple[str, bytes]]:
        while True:
            yield await self.recv()


async def consume(sub: Subscriber, topic: str, decode: Callable[[bytes], T], handle: Callable[[T], None]) -> None:
    """Receive forever: decode each message of `topic` and hand it to `handle`.

    A message that does not decode (or that `handle` rejects with ValueError) is logged and
    dropped: one bad publisher must not stop a consumer that serves every worker.
    """
    while True:
        got, payload = await sub.recv()
        if got != topic:
            continue
        try:
            handle(decode(payload))
        except (msgspec.DecodeError, ValueError) as err:
            log.warning("dropped a bad %s message: %s", topic, err)


# ==================================================================== zmq

_context: zmq.asyncio.Context | None = None
_context_pid = 0


def _zmq_context() -> zmq.asyncio.Context:
    """One context per process; a forked child must not reuse its parent's IO threads."""
    global _context, _context_pid
    if _context is None or _context_pid != os.getpid():
        _context = zmq.asyncio.Context()
        _context_pid = os.getpid()
    return _context


def _curve_server(sock: zmq.Socket[Any], curve_secret: bytes) -> None:
    """Serve CURVE with the fleet's key pair: peers must know its public half (derived from the
    cluster secret) to connect, and everything on the wire is encrypted."""
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_SECRETKEY, z85.encode(curve_secret))


def _curve_client(sock: zmq.Socket[Any], curve_secret: bytes) -> None:
    """Dial CURVE publishers of the fleet with a throw-away client key pair of our own."""
    public, secret = zmq.curve_keypair()
    sock.setsockopt(zmq.CURVE_SERVERKEY, zmq.curve_public(z85.encode(curve_secret)))
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret)


def _check_curve(curve_secret: bytes | None) -> None:
    if curve_secret is not None and len(curve_secret) != 32:
        raise ValueError("a CURVE secret key is 32 bytes")


class EventPublisher(Publisher):
    """ZMQ PUB socket. `publish` is synchronous (PUB never blocks); call it from one thread.
    With `curve_secret` (the cluster secret's event key) only CURVE peers holding it subscribe."""

    def __init__(
        self, bind: str = "tcp://127.0.0.1:0", hwm: int = DEFAULT_HWM, curve_secret: bytes | None = None
    ) -> None:
        if hwm <= 0:
            raise ValueError(f"hwm must be > 0; got {hwm}")
        _check_curve(curve_secret)
        # A plain (non-asyncio) socket on the shared context: sends complete immediately, so
        # publishing needs no await and no future per message.
        self._sock = zmq.Context(_zmq_context()).socket(zmq.PUB)
        self._sock.setsockopt(zmq.SNDHWM, hwm)
        self._sock.setsockopt(zmq.LINGER, 0)
        if curve_secret is not None:
            _curve_server(self._sock, curve_secret)
        try:
            self._sock.bind(bind)  # port 0 picks a free port, as with "*"
        except zmq.ZMQError as exc:
            self._sock.close()
            raise ValueError(f"cannot bind event publisher to {bind!r}: {exc}") from exc
        self._address = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.dropped = 0
        log.info("event publisher bound to %s", self._address)

    @property
    def address(self) -> str:
        return self._address

    def publish(self, topic: str, payload: bytes) -> None:
        try:
            self._sock.send_multipart((topic.encode(), payload), flags=zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1

    def close(self) -> None:
        self._sock.close(linger=0)


class EventSubscriber(Subscriber):
    """ZMQ SUB socket connected to any number of publishers."""

    def __init__(self, topics: list[str], hwm: int = DEFAULT_HWM, curve_secret: bytes | None = None) -> None:
        if hwm <= 0:
            raise ValueError(f"hwm must be > 0; got {hwm}")
        _check_curve(curve_secret)
        self._topics = frozenset(topics)
        self._sock = _zmq_context().socket(zmq.SUB)
        self._sock.setsockopt(zmq.RCVHWM, hwm)
        self._sock.setsockopt(zmq.LINGER, 0)
        if curve_secret is not None:
            _curve_client(self._sock, curve_secret)
        # ZMQ filters by prefix (on the publisher side); the exact match happens in recv.
        for topic in self._topics or {""}:
            self._sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self._connected: set[str] = set()

    @property
    def connected(self) -> frozenset[str]:
        return frozenset(self._connected)

    def connect(self, address: str) -> None:
        if address not in self._connected:
            self._sock.connect(address)
            self._connected.add(address)

    def disconnect(self, address: str) -> None:
        if address in self._connected:
            self._connected.discard(address)
            self._sock.disconnect(address)

    async def recv(self) -> tuple[str, bytes]:
        while True:
            parts = await self._sock.recv_multipart()
            if len(parts) != 2:
                log.warning("dropping event with %d parts (expected 2)", len(parts))
                continue
            topic = parts[0].decode(errors="replace")
            if not self._topics or topic in self._topics:
                return topic, parts[1]

    def close(self) -> None:
        self._sock.close(linger=0)


# ==================================================================== registry


@dataclass(frozen=True, slots=True)
class EventPlaneSpec:
    """Backend-neutral options. zmq: `address` is the publisher's bind endpoint; a brokered
    backend reads it as the server URL(s), comma-separated, plus the fields below."""

    address: str | None = None
    hwm: int = DEFAULT_HWM
    namespace: str = "lightspeed"
    user: str = ""
    password: str = ""
    creds_file: str = ""
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    stream_max_msgs: int = 100_000  # history kept per publisher (brokered streams)
    stream_max_age: float = 86400.0  # seconds; 0 = no age limit
    curve_secret: bytes | None = None  # zmq: the cluster secret's CURVE key (None: plane open)


@dataclass(frozen=True, slots=True)
class _Backend:
    publisher: Callable[[EventPlaneSpec], Publisher]
    subscriber: Callable[[list[str], EventPlaneSpec], Subscriber]


def _zmq_publisher(spec: EventPlaneSpec) -> Publisher:
    return EventPublisher(spec.address or "tcp://127.0.0.1:0", hwm=spec.hwm, curve_secret=spec.curve_secret)


def _zmq_subscriber(topics: list[str], spec: EventPlaneSpec) -> Subscriber:
    return EventSubscriber(topics, hwm=spec.hwm, curve_secret=spec.curve_secret)


_BACKENDS: dict[str, _Backend] = {"zmq": _Backend(_zmq_publisher, _zmq_subscriber)}


def register_event_plane(
    kind: str,
    publisher: Callable[[EventPlaneSpec], Publisher],
    subscriber: Callable[[list[str], EventPlaneSpec], Subscriber],
) -> None:
    """Add a backend (e.g. "nats") without touching callers of make_publisher/make_subscriber."""
    _BACKENDS[kind] = _Backend(publisher, subscriber)


def event_plane_kinds() -> tuple[str, ...]:
    return tuple(_BACKENDS)


def _backend(kind: str) -> _Backend:
    backend = _BACKENDS.get(kind)
    if backend is None:
        raise ValueError(f"event plane must be one of {', '.join(_BACKENDS)}; got {kind!r}")
    return backend


def make_publisher(kind: str = "zmq", *, address: str | None = None, hwm: int = DEFAULT_HWM) -> Publisher:
    return build_publisher(kind, EventPlaneSpec(address, hwm))


def build_publisher(kind: str, spec: EventPlaneSpec) -> Publisher:
    return _backend(kind).publisher(spec)


def build_subscriber(kind: str, topics: list[str], spec: EventPlaneSpec) -> Subscriber:
    return _backend(kind).subscriber(list(topics), spec)


def make_subscriber(
    kind: str = "zmq",
    topics: list[str] | None = None,
    *,
    address: str | None = None,
    hwm: int = DEFAULT_HWM,
) -> Subscriber:
    return _backend(kind).subscriber(list(topics or []), EventPlaneSpec(address, hwm))
