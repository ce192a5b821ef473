"""`lightspeed serve`: the embedded deployment in one command.

A supervisor starts N worker processes and the frontend process(es); they find each other
through file discovery in a private folder of this run, so nothing external is needed and two
`serve` runs on one machine never see each other's workers.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
import tempfile
import time

import aiohttp

from lightspeed.config import (
    FrontendConfig,
    PlaneConfig,
    RouterConfig,
    ServeConfig,
    WorkerConfig,
)
from lightspeed.runtime.supervisor import ChildSpec, Supervisor

log = logging.getLogger(__name__)


def plane_args(p: PlaneConfig) -> list[str]:
    return [
        "--discovery",
        p.discovery,
        "--discovery-path",
        p.discovery_path,
        "--discovery-ttl",
        str(p.discovery_ttl),
        "--event-plane",
        p.event_plane,
        "--namespace",
        p.namespace,
    ]


def worker_args(w: WorkerConfig) -> list[str]:
    return [
        "worker",
        "--engine",
        w.engine,
        "--model",
        w.model,
        "--served-model-name",
        w.served_model_name,
        "--role",
        w.role,
        "--worker-host",
        w.host,
        "--block-size",
        str(w.block_size),
        "--num-gpu-blocks",
        str(w.num_gpu_blocks),
        "--kv-cache-gb",
        str(w.kv_cache_gb),
        "--dtype",
        w.dtype,
        "--max-num-seqs",
        str(w.max_num_seqs),
        "--max-num-batched-tokens",
        str(w.max_num_batched_tokens),
        "--max-model-len",
        str(w.max_model_len),
        "--speedup-ratio",
        str(w.speedup_ratio),
        "--enable-prefix-caching",
        str(w.enable_prefix_caching),
        "--seed",
        str(w.seed),
        *plane_args(w.planes),
    ]


def frontend_args(f: FrontendConfig) -> list[str]:
    return [
        "frontend",
        "--host",
        f.host,
        "--port",
        str(f.port),
        "--router-mode",
        f.router_mode,
        "--max-body-bytes",
        str(f.max_body_bytes),
        "--frontend-processes",
        str(f.processes),
        "--migration-limit",
        str(f.migration_limit),
        *router_args(f.router),
        *plane_args(f.planes),
    ]


def router_args(r: RouterConfig) -> list[str]:
    return [
        "--kv-overlap-score-weight",
        str(r.overlap_score_weight),
        "--router-temperature",
        str(r.temperature),
        "--kv-events",
        str(r.kv_events),
        "--router-approx-ttl",
        str(r.approx_ttl),
        "--busy-decode-threshold",
        str(r.busy_decode_threshold),
        "--busy-prefill-frac",
        str(r.busy_prefill_frac),
        "--router-queue-policy",
        r.queue_policy,
        "--router-max-queue",
        str(r.max_queue),
        "--router-queue-timeout",
        str(r.queue_timeout),
        "--session-ttl",
        str(r.session_ttl),
        "--router-replica-sync",
        str(r.replica_sync),
    ]


def _with_private_discovery(cfg: ServeConfig, folder: str) -> ServeConfig:
    from dataclasses import replace

    planes = cfg.worker.planes
    if planes.discovery == "file" and not planes.discovery_path:
        planes = replace(planes, discovery_path=folder)
    return ServeConfig(replace(cfg.frontend, planes=planes), replace(cfg.worker, planes=planes), cfg.workers)


async def wait_ready(url: str, workers: int, timeout: float) -> bool:
    """Poll /health until `workers` workers are registered (model loading can take a while)."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(url + "/health") as resp:
                    body = await resp.json()
                    if len(body.get("workers", [])) >= workers:
                        return True
            except (aiohttp.ClientError, ValueError):
                pass
            await asyncio.sleep(0.25)
    return False


async def run_serve(cfg: ServeConfig) -> int:
    folder = tempfile.mkdtemp(prefix="lightspeed-serve-")
    cfg = _with_private_discovery(cfg, folder)
    sup = Supervisor()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        for i in range(cfg.workers):
            await sup.spawn(ChildSpec(f"worker-{i}", worker_args(cfg.worker)))
        for i in range(cfg.frontend.processes):
            await sup.spawn(ChildSpec(f"frontend-{i}", frontend_args(cfg.frontend)))
        return await _until_stopped(cfg, sup, stop)
    finally:
        await sup.stop()
        shutil.rmtree(folder, ignore_errors=True)


async def _until_stopped(cfg: ServeConfig, sup: Supervisor, stop: asyncio.Event) -> int:
    """Announce readiness, then wait for a signal (exit 0) or a child that gave up (exit 1)."""
    url = f"http://{cfg.frontend.host}:{cfg.frontend.port}"
    ready = asyncio.create_task(wait_ready(url, cfg.workers, timeout=600))
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
        return 1
    log.info("shutting down")
    return 0
