"""Compose and run one frontend process: discovery -> models -> router -> pipeline -> HTTP routes."""

from __future__ import annotations

import logging
import ssl

from aiohttp import web

from lightspeed.config import AuthConfig, ConfigError, FrontendConfig
from lightspeed.disagg.flow import DisaggFlow
from lightspeed.frontend.auth import AuthGate, KeyStore
from lightspeed.frontend.connections import ConnectionGuard, GuardedSite, HttpLimits, fit_to_fd_limit
from lightspeed.frontend.drain import CUT_GRACE_S, drain_http
from lightspeed.frontend.metrics import FrontendMetrics
from lightspeed.frontend.model_manager import ModelManager
from lightspeed.frontend.pipeline import Pipeline
from lightspeed.frontend.rate_limit import Limits, RateLimiter
from lightspeed.frontend.routes import FrontendApp, error_response
from lightspeed.frontend.worker_metrics import WorkerMetricsWatcher
from lightspeed.protocol import TOPIC_KV_EVENTS, TOPIC_LOAD_METRICS
from lightspeed.router.active import ActiveLoad
from lightspeed.router.factory import STATEFUL_MODES, build_selector
from lightspeed.router.indexer import KvIndex
from lightspeed.router.kv_events import KvEventFeed
from lightspeed.router.kv_router import KvSelector
from lightspeed.router.metrics import RouterMetrics
from lightspeed.router.push_router import PushRouter
from lightspeed.router.replica_sync import TOPIC_ROUTER_SYNC, ReplicaSync
from lightspeed.router.selector import WorkerSelector
from lightspeed.router.session import SessionAffinity
from lightspeed.runtime.discovery import Discovery
from lightspeed.runtime.lifecycle import startup_config_errors, until_signalled
from lightspeed.runtime.planes import (
    cluster_key,
    discovery_from_config,
    publisher_from_config,
    subscriber_from_config,
)
from lightspeed.runtime.request_plane import RequestPlaneClient

log = logging.getLogger(__name__)


class Frontend:
    def __init__(self, cfg: FrontendConfig, discovery: Discovery | None = None) -> None:
        self.cfg = cfg
        self.discovery = discovery if discovery is not None else discovery_from_config(cfg.planes)
        self.models = ModelManager(self.discovery, cfg.served_model_name, cfg.planes.discovery_ttl)
        self.client = RequestPlaneClient(key=cluster_key(cfg.planes))
        self.active = ActiveLoad()
        metrics = FrontendMetrics()
        self.router_metrics = RouterMetrics(metrics.registry)
        selector = build_selector(cfg.router_mode, cfg.router, self.active, self.router_metrics)
        sessions = SessionAffinity(cfg.router.session_ttl, enabled=cfg.router.session_affinity)
        self.router = PushRouter(self.client, selector, self.active, sessions)
        self.models.on_worker_removed.append(self.router.remove_worker)
        self.kv_feed = self._kv_feed(selector)
        self.replicas = self._replica_sync(selector)
        disagg = DisaggFlow(self.router, self.client, cfg.disagg, metrics.registry, self.models.report_down)
        self.pipeline = Pipeline(
            self.models,
            self.router,
            cfg.migration_limit,
            lambda model: metrics.migrations.labels(model).inc(),
            disagg=disagg,
        )
        self.http = FrontendApp(self.models, self.pipeline, metrics, cfg.max_body_bytes)
        self.connections = ConnectionGuard(http_limits(cfg))
        self.http.app.middlewares.insert(0, self.connections.middleware)  # outermost: every request
        self.auth = front_door(cfg.auth)
        if self.auth is not None:  # after the connection guard, before any route or error handling
            self.http.app.middlewares.insert(1, self.auth.middleware)
            self.http.charge_tokens = self.auth.charge
        self.worker_metrics = WorkerMetricsWatcher(
            subscriber_from_config(cfg.planes, [TOPIC_LOAD_METRICS]), self.http.metrics.registry
        )
        self.models.on_worker_added.append(self.worker_metrics.worker_added)
        self.models.on_worker_removed.append(self.worker_metrics.worker_removed)
        self._runner: web.AppRunner | None = None
        self.port = cfg.port

    def _kv_feed(self, selector: WorkerSelector) -> KvEventFeed | None:
        """KV modes with events: keep the selector's prefix index fed from every worker."""
        if not isinstance(selector, KvSelector) or not isinstance(selector.index, KvIndex):
            return None
        feed = KvEventFeed(
            subscriber_from_config(self.cfg.planes, [TOPIC_KV_EVENTS]), selector.index, self.client, self.router_metrics
        )
        self.models.on_worker_added.append(feed.worker_added)
        self.models.on_worker_removed.append(feed.worker_removed)
        return feed

    def _replica_sync(self, selector: WorkerSelector) -> ReplicaSync | None:
        """Stateful modes: share active load with the other frontends of this namespace."""
        if not self.cfg.router.replica_sync or self.cfg.router_mode not in STATEFUL_MODES:
            return None
        planes = self.cfg.planes
        sync = ReplicaSync(
            self.active,
            publisher_from_config(planes, self.cfg.cluster_host, self.cfg.advertise_host),
            subscriber_from_config(planes, [TOPIC_ROUTER_SYNC]),
            self.discovery,
            planes.namespace,
            selector.mirror,
        )
        self.models.on_peer_added.append(sync.peer_added)
        self.models.on_peer_removed.append(sync.peer_removed)
        return sync

    async def start(self) -> None:
        if self.kv_feed is not None:
            await self.kv_feed.start()
        if self.replicas is not None:
            await self.replicas.start()
        await self.worker_metrics.start()
        self.http.metrics.loop_monitor.start()
        await self.models.start()
        self._runner = web.AppRunner(
            self.http.app,
            handler_cancellation=True,
            access_log=None,
            shutdown_timeout=CUT_GRACE_S,
            keepalive_timeout=self.cfg.http_keepalive_timeout,
        )
        await self._runner.setup()
        site = GuardedSite(
            self._runner,
            self.cfg.host,
            self.cfg.port,
            self.connections,
            reuse_port=self.cfg.processes > 1,
            backlog=1024,
            ssl_context=tls_context(self.cfg.auth),
        )
        await site.start()
        bound = self._runner.addresses  # the port actually bound, for port 0 in tests
        if bound:
            self.port = bound[0][1]
        scheme = "https" if self.cfg.auth.tls_cert else "http"
        keys = "API keys required" if self.auth is not None else "no API key required"
        log.info(
            "frontend listening on %s://%s:%d (router %s, %s)",
            scheme,
            self.cfg.host,
            self.port,
            self.cfg.router_mode,
            keys,
        )

    async def stop(self) -> None:
        if self._runner is not None:  # in-flight streams end properly, cut or not (drain.py)
            await drain_http(self._runner, self.http.streams, self.cfg.drain_timeout)
        if self.replicas is not None:
            await self.replicas.stop()
        await self.models.stop()
        if self.kv_feed is not None:
            await self.kv_feed.stop()
        await self.worker_metrics.stop()
        await self.http.metrics.loop_monitor.stop()
        self.pipeline.cpu.shutdown()
        await self.client.close()
        await self.discovery.close()


def front_door(cfg: AuthConfig) -> AuthGate | None:
    """The API-key gate of `cfg` (None: the API is open). A bad keys file is a ConfigError."""
    if not cfg.keys_enabled:
        return None
    defaults = Limits(cfg.rate_limit_rpm, cfg.rate_limit_tpm)
    try:
        store = KeyStore.load(cfg.api_key, cfg.api_keys_file, defaults)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    public = {"/live"} | ({"/health"} if cfg.public_health else set()) | ({"/metrics"} if cfg.public_metrics else set())
    return AuthGate(store, RateLimiter(store.limits()), public, error_response)


def tls_context(cfg: AuthConfig) -> ssl.SSLContext | None:
    """A server TLS context from --tls-cert / --tls-key (None: plain HTTP)."""
    if not cfg.tls_cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    except (OSError, ssl.SSLError) as err:
        raise ConfigError(f"cannot load TLS certificate {cfg.tls_cert} / key {cfg.tls_key}: {err}") from None
    return ctx


def http_limits(cfg: FrontendConfig) -> HttpLimits:
    """The connection limits of `cfg`, the cap lowered to what the descriptor limit allows."""
    return HttpLimits(cfg.http_header_timeout, cfg.http_body_timeout, fit_to_fd_limit(cfg.max_connections))


async def run_frontend(cfg: FrontendConfig) -> None:
    """Run until SIGINT/SIGTERM, then shut down cleanly."""
    with startup_config_errors():
        frontend = Frontend(cfg)
        await frontend.start()
    await until_signalled()
    log.info("frontend shutting down")
    await frontend.stop()
