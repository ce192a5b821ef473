"""`lightspeed serve`: the embedded deployment in one command.

A supervisor starts N worker processes and the frontend process(es); they find each other
through file discovery in a private folder of this run, so nothing external is needed and two
`serve` runs on one machine never see each other's workers.

Shutdown (SIGTERM/SIGINT): every child is told to drain at once. Workers let in-flight streams
run for `--drain-timeout` seconds, then cut them; the frontend reports each cut stream to its
client in-band and ends the response properly, and ends any stream still open a moment after
the workers' deadline itself. Only children still alive `SHUTDOWN_MARGIN_S` after the drain
timeout are SIGKILLed, so a kill never lands in the middle of a drain.

Because this run owns its discovery folder, the supervisor removes a worker's entry the moment
the worker process exits, so no frontend routes to (or reports healthy) a dead worker while the
entry would otherwise wait out its TTL.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
import tempfile
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import aiohttp

from lightspeed.config import (
    CHILD_CONFIG_ENV,
    CONFIG_ERROR_EXIT,
    AuthConfig,
    FrontendConfig,
    PlaneConfig,
    Role,
    ServeConfig,
    WorkerConfig,
    encode_config,
    parse_disagg,
)
from lightspeed.frontend.auth import parse_keys
from lightspeed.frontend.rate_limit import Limits
from lightspeed.runtime.cluster_auth import generate_secret
from lightspeed.runtime.discovery import remove_entries_of
from lightspeed.runtime.supervisor import ChildSpec, Supervisor

log = logging.getLogger(__name__)
# Past the drain timeout, time for the frontend to report cut streams and for everyone to exit.
SHUTDOWN_MARGIN_S = 5.0
WORKER_GROUP = "worker"
# After removing a retiring worker's discovery entry: longer than the frontends' discovery scan
# (0.25 s), so no new request is routed to it when it starts refusing them.
DEREGISTER_SETTLE_S = 1.0


def child_spec(name: str, cfg: FrontendConfig | WorkerConfig, log_level: str, private_folder: str = "") -> ChildSpec:
    """A child gets its whole config as one JSON value (cli.py reads it back), not rebuilt flags.
    A worker registered in this run's private discovery folder is removed from it on exit."""
    command = "frontend" if isinstance(cfg, FrontendConfig) else "worker"
    env = {CHILD_CONFIG_ENV: encode_config(cfg), "LIGHTSPEED_LOG_LEVEL": log_level}
    spec = ChildSpec(name, [command], env=env)
    if isinstance(cfg, WorkerConfig) and private_folder and cfg.planes.discovery_path == private_folder:
        spec.on_exit = partial(remove_entries_of, private_folder)
    return spec


def make_supervisor(cfg: ServeConfig) -> Supervisor:
    drain = max(cfg.frontend.drain_timeout, cfg.worker.drain_timeout)
    return Supervisor(grace_seconds=drain + SHUTDOWN_MARGIN_S, liveness_seconds=cfg.liveness_timeout)


def _with_planes(cfg: ServeConfig, planes: PlaneConfig) -> ServeConfig:
    """`planes` for the frontend and the workers alike (serve requires them equal)."""
    return replace(cfg, frontend=replace(cfg.frontend, planes=planes), worker=replace(cfg.worker, planes=planes))


def _with_private_discovery(cfg: ServeConfig, folder: str) -> ServeConfig:
    planes = cfg.worker.planes
    if planes.discovery == "file" and not planes.discovery_path:
        planes = replace(planes, discovery_path=folder)
    return _with_planes(cfg, planes)


def _with_cluster_secret(cfg: ServeConfig) -> ServeConfig:
    """Close this run's internal planes with a fresh cluster secret unless one was given."""
    planes = cfg.worker.planes
    if not planes.cluster_secret:
        planes = replace(planes, cluster_secret=generate_secret())
    return _with_planes(cfg, planes)


def frontend_url(cfg: ServeConfig) -> str:
    scheme = "https" if cfg.frontend.auth.tls_cert else "http"
    return f"{scheme}://{cfg.frontend.host}:{cfg.frontend.port}"


def readiness_headers(auth: AuthConfig) -> dict[str, str]:
    """serve polls its own frontend's /health: with API keys, it presents one of them."""
    key = auth.api_key
    if not key and auth.api_keys_file:
        key = parse_keys(Path(auth.api_keys_file).read_text(), Limits())[0][0]
    return {"Authorization": f"Bearer {key}"} if key else {}


async def wait_ready(url: str, workers: int, timeout: float, headers: dict[str, str] | None = None) -> bool:
    """Poll /health until `workers` healthy workers are registered (model loading can take a while).
    Its own frontend on loopback: a TLS certificate is not checked here."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(headers=headers, connector=aiohttp.TCPConnector(ssl=False)) as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(url + "/health") as resp:
                    body = await resp.json()
                    healthy = [w for w in body.get("workers", []) if w.get("healthy", True)]
                    if len(healthy) >= workers:
                        return True
            except (aiohttp.ClientError, ValueError):
                pass
            await asyncio.sleep(0.25)
    return False


async def run_serve(cfg: ServeConfig, log_level: str = "INFO") -> int:
    folder = tempfile.mkdtemp(prefix="lightspeed-serve-")
    cfg = _with_cluster_secret(_with_private_discovery(cfg, folder))
    if cfg.disagg:  # readiness counts both pools
        cfg = replace(cfg, workers=sum(parse_disagg(cfg.disagg)))
    sup = make_supervisor(cfg)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    planner: asyncio.Task[None] | None = None
    try:
        scaler = LocalWorkerScaler(sup, cfg, log_level, folder)
        if cfg.disagg:
            for spec in disagg_worker_specs(cfg, log_level, folder):
                await sup.spawn(spec)
        else:
            await scaler.scale_to(cfg.workers)
        for i in range(cfg.frontend.processes):
            await sup.spawn(child_spec(f"frontend-{i}", cfg.frontend, log_level))
        if cfg.planner.enabled:
            planner = asyncio.create_task(_run_planner(cfg, scaler, stop), name="planner")
        return await _until_stopped(cfg, sup, stop)
    finally:
        if planner is not None:
            planner.cancel()
            await asyncio.gather(planner, return_exceptions=True)
        await sup.stop()
        shutil.rmtree(folder, ignore_errors=True)


def disagg_worker_specs(cfg: ServeConfig, log_level: str, folder: str) -> list[ChildSpec]:
    """`--disagg xPyD`: x prefill and y decode workers (the role is on each worker's card; more
    workers may join either pool with `lightspeed worker --role prefill|decode`)."""
    prefill, decode = parse_disagg(cfg.disagg)
    pools: tuple[tuple[Role, int], ...] = (("prefill", prefill), ("decode", decode))
    return [
        child_spec(f"{role}-{i}", replace(cfg.worker, role=role), log_level, folder)
        for role, count in pools
        for i in range(count)
    ]


class LocalWorkerScaler:
    """The worker group of this serve, as the planner's local connector scales it.

    Scale-down never cuts a request: a retired worker is first removed from discovery (the
    frontends stop routing to it at their next scan), then told to stop: it refuses new streams
    (a request routed there meanwhile is re-sent elsewhere by the frontend), lets the in-flight
    ones finish within its drain timeout and exits.
    """

    def __init__(self, sup: Supervisor, cfg: ServeConfig, log_level: str, folder: str) -> None:
        self._sup, self._cfg, self._log_level, self._folder = sup, cfg, log_level, folder

    def worker_count(self) -> int:
        return self._sup.group_size(WORKER_GROUP)

    async def scale_to(self, n: int) -> int:
        return await self._sup.scale_to(WORKER_GROUP, n, self._spec, self._deregister)

    def _spec(self, index: int) -> ChildSpec:
        return child_spec(f"worker-{index}", self._cfg.worker, self._log_level, self._folder)

    async def _deregister(self, pid: int) -> None:
        if self._cfg.worker.planes.discovery_path == self._folder:
            remove_entries_of(self._folder, pid)
            await asyncio.sleep(DEREGISTER_SETTLE_S)


async def _run_planner(cfg: ServeConfig, scaler: LocalWorkerScaler, stop: asyncio.Event) -> None:
    """The SLA planner in-process (`serve --planner`), once the fleet is ready."""
    from lightspeed.planner.connectors import LocalConnector
    from lightspeed.planner.planner_cli import open_planner, run_planner_until

    url = frontend_url(cfg)
    headers = readiness_headers(cfg.frontend.auth)  # its own frontend: the key, no TLS check
    if not await wait_ready(url, cfg.workers, timeout=600, headers=headers):
        log.error("planner: the fleet never became ready; not planning")
        return
    running = await open_planner(cfg.planner, url, LocalConnector(scaler), cfg.worker.planes, headers=headers)
    log.info(
        "planner: %s mode, every %.0fs, %d..%d workers",
        cfg.planner.mode,
        cfg.planner.adjustment_interval,
        cfg.planner.min_workers,
        cfg.planner.max_workers,
    )
    await run_planner_until(running, stop)


async def _until_stopped(cfg: ServeConfig, sup: Supervisor, stop: asyncio.Event) -> int:
    """Announce readiness, then wait for a signal (exit 0) or a child that failed for good: exit 2
    when it was a configuration error (so scripts see the same status as from the child), else 1."""
    url = frontend_url(cfg)
    headers = readiness_headers(cfg.frontend.auth)
    ready = asyncio.create_task(wait_ready(url, cfg.workers, timeout=600, headers=headers))
    stopped = asyncio.create_task(stop.wait())
    failed = asyncio.create_task(sup.failed.wait())
    try:
        await asyncio.wait([ready, stopped, failed], return_when=asyncio.FIRST_COMPLETED)
        if ready.done() and ready.result():
            log.info("Lightspeed is ready: %s/v1 (%d %s workers)", url, cfg.workers, cfg.worker.engine)
        await asyncio.wait([stopped, failed], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (ready, stopped, failed):
            task.cancel()
    if failed.done() and not failed.cancelled():
        log.error("a process failed for good; shutting everything down")
        return CONFIG_ERROR_EXIT if sup.failed_code == CONFIG_ERROR_EXIT else 1
    log.info("shutting down")
    return 0
