"""A worker's HTTP probes for orchestrators (Kubernetes liveness / readiness), off by default.

* `GET /live`: 200 as long as the worker's event loop answers (a wedged loop fails the probe and
  the pod is restarted); also while the model is still loading.
* `GET /health`: 200 `{"status": "ready"}` once the engine runs and the worker is registered in
  discovery; 503 with `starting` before that and `draining` after SIGTERM, so traffic (and a
  rolling update) waits for a worker that can serve.

The probes carry no request data and accept no input, so they are served without the cluster
secret; bind them where the orchestrator can reach them (the worker's --worker-host).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal

from aiohttp import web

log = logging.getLogger(__name__)

WorkerState = Literal["starting", "ready", "draining"]


class HealthServer:
    def __init__(self, host: str, port: int, state: Callable[[], WorkerState]) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"health port must be in 0..65535; got {port}")
        self._host, self._port, self._state = host, port, state
        self._runner: web.AppRunner | None = None
        self.port = port

    async def start(self) -> int:
        """Listen; returns the bound port (the real one for port 0)."""
        app = web.Application()
        app.add_routes([web.get("/live", self._live), web.get("/health", self._health)])
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self._host, self._port).start()
        addresses = self._runner.addresses
        self.port = addresses[0][1] if addresses else self._port
        log.info("worker probes on http://%s:%d (/live, /health)", self._host, self.port)
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _live(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "live"})

    async def _health(self, request: web.Request) -> web.Response:
        state = self._state()
        return web.json_response({"status": state}, status=200 if state == "ready" else 503)
