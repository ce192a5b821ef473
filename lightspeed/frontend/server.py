"""Compose and run one frontend process: discovery -> models -> router -> pipeline -> HTTP."""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

from lightspeed.config import FrontendConfig
from lightspeed.frontend.app import FrontendApp
from lightspeed.frontend.metrics import FrontendMetrics
from lightspeed.frontend.model_manager import ModelManager
from lightspeed.frontend.pipeline import Pipeline
from lightspeed.router.active import ActiveLoad
from lightspeed.router.push_router import PushRouter
from lightspeed.router.selector import make_selector
from lightspeed.runtime.discovery import Discovery
from lightspeed.runtime.request_plane import RequestPlaneClient
from lightspeed.runtime.planes import discovery_from_config, subscriber_from_config
from lightspeed.frontend.worker_metrics import WorkerMetricsWatcher
from lightspeed.protocol import TOPIC_LOAD_METRICS

log = logging.getLogger(__name__)


class Frontend:
    def __init__(self, cfg: FrontendConfig, discovery: Discovery | None = None) -> None:
        self.cfg = cfg
        self.discovery = discovery if discovery is not None else discovery_from_config(cfg.planes)
        self.models = ModelManager(self.discovery, cfg.served_model_name)
        self.client = RequestPlaneClient()
        self.active = ActiveLoad()
        self.router = PushRouter(self.client, make_selector(cfg.router_mode, self.active), self.active)
        self.models.on_worker_removed.append(self.active.remove_worker)
        self.pipeline = Pipeline(self.models, self.router, cfg.migration_limit)
        self.http = FrontendApp(self.models, self.pipeline, FrontendMetrics(), cfg.max_body_bytes)
        self.worker_metrics = WorkerMetricsWatcher(
            subscriber_from_config(cfg.planes, [TOPIC_LOAD_METRICS]), self.http.metrics.registry)
        self.models.on_worker_added.append(self.worker_metrics.worker_added)
        self.models.on_worker_removed.append(self.worker_metrics.worker_removed)
        self._runner: web.AppRunner | None = None
        self.port = cfg.port

    async def start(self) -> None:
        await self.worker_metrics.start()
        await self.models.start()
        self._runner = web.AppRunner(self.http.app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.cfg.host, self.cfg.port,
                           reuse_port=self.cfg.processes > 1, backlog=1024)
        await site.start()
        server = site._server  # the bound port, for port 0 in tests
        if server is not None and server.sockets:  # type: ignore[union-attr]
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        log.info("frontend listening on http://%s:%d (router %s)", self.cfg.host, self.port,
                 self.cfg.router_mode)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        await self.models.stop()
        await self.worker_metrics.stop()
        await self.client.close()
        await self.discovery.close()


async def run_frontend(cfg: FrontendConfig) -> None:
    """Run until SIGINT/SIGTERM, then shut down cleanly."""
    frontend = Frontend(cfg)
    await frontend.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("frontend shutting down")
    await frontend.stop()
