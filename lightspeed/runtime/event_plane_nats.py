"""Event plane on NATS (`nats-py`), with KV events kept on a JetStream stream.

Subjects: `lightspeed.<namespace>.<topic>.<publisher id>`. A publisher's `address` (the card's
`events_address`) is `nats://<server>/<publisher id>`; a subscriber's `connect(address)` subscribes
to that publisher's subjects of its topics on its own configured servers, so consumers keep the
zmq contract (connect to each worker found in discovery) and the server part is only a label.

Load metrics, forward-pass metrics and router replica sync are plain NATS messages: periodic or
self-correcting, so losing some is fine, as with zmq. KV events are captured by the stream
`LIGHTSPEED_<namespace>_KV` (file storage, `stream_max_msgs` kept per publisher, optional age
limit), and a subscriber reads each publisher's KV subject through an ordered consumer that starts
at the first retained message. So a router that starts late replays a worker's history as
ordinary events instead of asking the worker for a dump; a router whose connection drops (NATS
restart) resumes from the last stream sequence it saw (nats-py's ordered consumer re-creates the
consumer there when heartbeats stop). When the stream has trimmed part of the history, the first
replayed event's id is not the one the router expects: the router's gap detection asks for a dump
as it does with zmq.

Publishing stays synchronous and never blocks the engine: `publish` appends to a bounded queue
that one task sends in order; past `hwm` queued messages new ones are dropped and counted.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import re
import ssl
import uuid
from typing import Any
from urllib.parse import urlsplit

from lightspeed.protocol import TOPIC_KV_EVENTS
from lightspeed.runtime.event_plane import EventPlaneSpec, Publisher, Subscriber, register_event_plane

log = logging.getLogger(__name__)

RETRY_S = 0.5
HEARTBEAT_S = 1.0  # ordered consumer: two missed heartbeats re-create it from the last sequence
_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")
_background: set[asyncio.Task[None]] = set()  # closing tasks, kept referenced until done


def servers_of(spec: EventPlaneSpec) -> list[str]:
    servers = [s.strip() for s in (spec.address or "").split(",") if s.strip()]
    if not servers:
        raise ValueError("nats_url: give at least one nats:// URL")
    for server in servers:
        url = urlsplit(server if "://" in server else f"nats://{server}")
        if url.scheme not in ("nats", "tls") or not url.hostname:
            raise ValueError(f"nats_url: {server!r} is not a nats:// or tls:// URL")
    if not _TOKEN.match(spec.namespace):
        raise ValueError(
            f"namespace must be letters, digits, '-' or '_' with --event-plane nats; got {spec.namespace!r}"
        )
    return servers


def stream_name(namespace: str) -> str:
    return f"LIGHTSPEED_{namespace}_KV"


def subject(namespace: str, topic: str, publisher_id: str) -> str:
    return f"lightspeed.{namespace}.{topic}.{publisher_id}"


def _ssl_context(spec: EventPlaneSpec) -> ssl.SSLContext | None:
    if not (spec.ca_file or spec.cert_file):
        return None
    context = ssl.create_default_context(cafile=spec.ca_file or None)
    if spec.cert_file:
        context.load_cert_chain(spec.cert_file, spec.key_file)
    return context


def connect_options(spec: EventPlaneSpec) -> dict[str, Any]:
    """Keyword arguments of `nats.connect` for `spec` (servers, credentials, TLS, reconnects)."""
    options: dict[str, Any] = {
        "servers": servers_of(spec),
        "max_reconnect_attempts": -1,  # a NATS restart must not end the plane
        "reconnect_time_wait": RETRY_S,
        "connect_timeout": 2,
        "ping_interval": 5,
        "max_outstanding_pings": 2,
    }
    if spec.user:
        options["user"], options["password"] = spec.user, spec.password
    if spec.creds_file:
        options["user_credentials"] = spec.creds_file
    tls = _ssl_context(spec)
    if tls is not None:
        options["tls"] = tls
    return options


async def _log_error(err: Exception) -> None:
    log.warning("nats: %s", err)


class _Session:
    """One NATS connection, opened on first use and retried until it opens."""

    def __init__(self, spec: EventPlaneSpec) -> None:
        self.spec = spec
        self.nc: Any = None
        self._lock = asyncio.Lock()

    async def connection(self) -> Any:
        import nats

        async with self._lock:
            while self.nc is None:
                try:
                    self.nc = await nats.connect(
                        **connect_options(self.spec), error_cb=_log_error, reconnected_cb=self._reconnected
                    )
                    await self.ensure_stream()
                except (TimeoutError, OSError, nats.errors.Error) as err:
                    if self.nc is not None:
                        await self.nc.close()
                        self.nc = None
                    log.warning("nats: cannot connect to %s or set up JetStream (%s); retrying", self.spec.address, err)
                    await asyncio.sleep(RETRY_S)
            return self.nc

    async def ensure_stream(self) -> None:
        """Create the KV-events stream if missing (a restarted server without its store lost it)."""
        from nats.js.api import StorageType, StreamConfig
        from nats.js.errors import BadRequestError

        spec = self.spec
        config = StreamConfig(
            name=stream_name(spec.namespace),
            subjects=[f"lightspeed.{spec.namespace}.{TOPIC_KV_EVENTS}.*"],
            max_msgs_per_subject=spec.stream_max_msgs,
            max_age=spec.stream_max_age or None,
            storage=StorageType.FILE,
        )
        js = self.nc.jetstream()
        try:
            await js.add_stream(config)
        except BadRequestError:  # exists with other limits (another version's settings): use it
            log.info("nats: stream %s exists with other settings; using it as is", config.name)

    async def _reconnected(self) -> None:
        log.info("nats: reconnected to %s", self.nc.connected_url.netloc if self.nc else "?")
        with contextlib.suppress(Exception):
            await self.ensure_stream()

    def close(self) -> None:
        nc, self.nc = self.nc, None
        if nc is not None:
            _spawn(nc.close())


def _spawn(coro: Any) -> None:
    """Run a closing coroutine from sync code, if a loop is still running."""
    try:
        task = asyncio.get_running_loop().create_task(coro)
    except RuntimeError:
        coro.close()
        return
    _background.add(task)
    task.add_done_callback(_background.discard)


class NatsPublisher(Publisher):
    def __init__(self, spec: EventPlaneSpec) -> None:
        servers = servers_of(spec)
        if spec.hwm <= 0:
            raise ValueError(f"hwm must be > 0; got {spec.hwm}")
        self.publisher_id = uuid.uuid4().hex[:16]
        label = urlsplit(servers[0] if "://" in servers[0] else f"nats://{servers[0]}")
        self._address = f"nats://{label.hostname}:{label.port or 4222}/{self.publisher_id}"
        self._spec = spec
        self._session = _Session(spec)
        self._queue: collections.deque[tuple[str, bytes]] = collections.deque()
        self._wake = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None
        self.dropped = 0
        self.sent = 0

    @property
    def address(self) -> str:
        return self._address

    def publish(self, topic: str, payload: bytes) -> None:
        if len(self._queue) >= self._spec.hwm:
            self.dropped += 1
            return
        self._queue.append((subject(self._spec.namespace, topic, self.publisher_id), payload))
        self._wake.set()
        if self._sender is None:
            self._sender = asyncio.get_running_loop().create_task(self._send(), name="nats-publisher")

    async def _send(self) -> None:
        import nats

        nc = await self._session.connection()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                subj, payload = self._queue.popleft()
                try:
                    await nc.publish(subj, payload)
                    self.sent += 1
                except nats.errors.Error as err:  # outbound buffer full while reconnecting, closed
                    self.dropped += 1
                    log.debug("nats: dropped a message on %s: %s", subj, err)

    async def flush(self) -> None:
        """Until every queued message is handed to the server (tests, orderly shutdown)."""
        while self._queue:
            await asyncio.sleep(0.01)
        if self._session.nc is not None:
            await self._session.nc.flush()

    def close(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
        nc, self._session.nc = self._session.nc, None
        if nc is not None:
            _spawn(self._retire(nc))

    async def _retire(self, nc: Any) -> None:
        """Purge this publisher's KV history, then close. A stopped worker's cache is gone with
        it, so its history is worthless; purging keeps the stream to live workers (a SIGKILLed
        worker's history stays until `stream_max_age`)."""
        ns = self._spec.namespace
        with contextlib.suppress(Exception):
            await nc.flush(timeout=1)
            await nc.jetstream().purge_stream(stream_name(ns), subject=subject(ns, TOPIC_KV_EVENTS, self.publisher_id))
        with contextlib.suppress(Exception):
            await nc.close()


class NatsSubscriber(Subscriber):
    """Core subscriptions for plain topics; an ordered JetStream consumer for KV events."""

    def __init__(self, topics: list[str], spec: EventPlaneSpec) -> None:
        servers_of(spec)
        if spec.hwm <= 0:
            raise ValueError(f"hwm must be > 0; got {spec.hwm}")
        self._topics = sorted(set(topics))
        self._spec = spec
        self._session = _Session(spec)
        # (topic, payload, publisher id, generation): recv drops what a stale subscription queued
        self._queue: asyncio.Queue[tuple[str, bytes, str, int]] = asyncio.Queue(maxsize=spec.hwm)
        self._subs: dict[str, asyncio.Task[list[Any]]] = {}  # publisher id -> its subscriptions
        self.dropped = 0
        self.last_stream_seq: dict[str, int] = {}  # publisher id -> last KV-event stream sequence seen
        # publisher id -> generation of its current subscriptions: messages still arriving on an
        # older one (a disconnect's unsubscribe is asynchronous) must not interleave with a new
        # one's replay, which would look like a gap
        self._live: dict[str, int] = {}
        self._generations = itertools.count(1)

    @property
    def keeps_history(self) -> bool:
        return TOPIC_KV_EVENTS in self._topics

    @staticmethod
    def publisher_id(address: str) -> str:
        pid = urlsplit(address).path.strip("/")
        if not _TOKEN.match(pid):
            raise ValueError(f"not a NATS event-plane address: {address!r}")
        return pid

    def connect(self, address: str) -> None:
        pid = self.publisher_id(address)
        if pid not in self._subs:
            self._live[pid] = gen = next(self._generations)
            self._subs[pid] = asyncio.get_running_loop().create_task(self._subscribe(pid, gen), name=f"nats-sub-{pid}")

    def disconnect(self, address: str) -> None:
        pid = self.publisher_id(address)
        self._live.pop(pid, None)
        task = self._subs.pop(pid, None)
        if task is not None:
            _spawn(_unsubscribe(task))

    async def _subscribe(self, pid: str, gen: int) -> list[Any]:
        """Subscribe to `pid`'s subjects, retrying while the server refuses (no stream yet, a
        JetStream outage): a consumer that silently never subscribed would wait forever."""
        import nats

        while True:
            try:
                return await self._subscribe_once(pid, gen)
            except (TimeoutError, nats.errors.Error) as err:
                log.warning("nats: subscribing to publisher %s failed (%s); retrying", pid, err)
                await asyncio.sleep(RETRY_S)
                with contextlib.suppress(TimeoutError, nats.errors.Error):
                    await self._session.ensure_stream()

    async def _subscribe_once(self, pid: str, gen: int) -> list[Any]:
        from nats.js.api import DeliverPolicy

        nc = await self._session.connection()
        subs: list[Any] = []
        ns = self._spec.namespace
        try:
            for topic in self._topics or ["*"]:
                subj = subject(ns, topic, pid)
                if topic != TOPIC_KV_EVENTS:
                    subs.append(await nc.subscribe(subj, cb=self._handler(pid, gen)))
                    continue
                consumer = nc.jetstream().subscribe(
                    subj,
                    cb=self._handler(pid, gen),
                    ordered_consumer=True,
                    deliver_policy=DeliverPolicy.ALL,
                    idle_heartbeat=HEARTBEAT_S,
                )
                subs.append(await consumer)
        except BaseException:  # all or nothing, so a retry subscribes nothing twice
            await _unsubscribe_all(subs)
            raise
        return subs

    def _handler(self, pid: str, gen: int) -> Any:
        async def handle(msg: Any) -> None:
            if self._live.get(pid) != gen:
                return  # from a subscription being torn down
            if msg.reply and msg.reply.startswith("$JS.ACK."):  # from the stream: note how far
                self.last_stream_seq[pid] = msg.metadata.sequence.stream
            self._offer(msg.subject, msg.data, pid, gen)

        return handle

    def _offer(self, subj: str, data: bytes, pid: str, gen: int) -> None:
        parts = subj.split(".")
        try:
            self._queue.put_nowait((parts[2] if len(parts) == 4 else "", data, pid, gen))
        except asyncio.QueueFull:
            self.dropped += 1

    async def retained(self, address: str) -> int:
        pid = self.publisher_id(address)
        task = self._subs.get(pid)
        if task is None:
            return 0
        await asyncio.shield(task)  # subscribed once this returns
        if TOPIC_KV_EVENTS not in self._topics:
            return 0
        nc = await self._session.connection()
        subj = subject(self._spec.namespace, TOPIC_KV_EVENTS, pid)
        info = await nc.jetstream().stream_info(stream_name(self._spec.namespace), subjects_filter=subj)
        return int((info.state.subjects or {}).get(subj, 0))

    async def recv(self) -> tuple[str, bytes]:
        while True:
            topic, data, pid, gen = await self._queue.get()
            if self._live.get(pid) == gen:
                return topic, data

    def close(self) -> None:
        for task in self._subs.values():
            task.cancel()
        self._subs.clear()
        self._session.close()


async def _unsubscribe(task: asyncio.Task[list[Any]]) -> None:
    try:
        subs = await task
    except (asyncio.CancelledError, Exception):  # cancelled or failed: it undid its own subscriptions
        return
    await _unsubscribe_all(subs)


async def _unsubscribe_all(subs: list[Any]) -> None:
    for sub in subs:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


def _publisher(spec: EventPlaneSpec) -> Publisher:
    return NatsPublisher(spec)


def _subscriber(topics: list[str], spec: EventPlaneSpec) -> Subscriber:
    return NatsSubscriber(topics, spec)


register_event_plane("nats", _publisher, _subscriber)
