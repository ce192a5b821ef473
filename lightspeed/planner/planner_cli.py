"""`lightspeed planner` (standalone process) and the wiring `serve --planner` shares with it.

`open_planner` builds one running planner from its options: the frontend observer (its
/metrics URL), the forward-pass follower (when discovery is reachable), the step-time model
(`--perf-model`, else the one the workers publish on their cards, else Dynamo's fit), the
engine limits from the workers' cards, the planner's own /metrics server and the service loop.

A standalone planner acts through `virtual` or `kubernetes`; the `local` connector needs the
supervisor of a `serve`, so it runs in-process there (`serve --planner`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import aiohttp
import msgspec
from aiohttp import web

from lightspeed.config import ConfigError, PlaneConfig, PlannerOptions, opt
from lightspeed.options import add_flags, build_config, flag_specs, resolve
from lightspeed.planner.arithmetic import Budget, EngineLimits, SlaTarget
from lightspeed.planner.connectors import Connector, ConnectorSettings, make_connector
from lightspeed.planner.core import Planner, PlannerConfig
from lightspeed.planner.metrics import PlannerMetrics, serve_metrics
from lightspeed.planner.observe import ForwardPassAggregator
from lightspeed.planner.service import PlannerService
from lightspeed.planner.sources import (
    ForwardPassFollower,
    FrontendObserver,
    PlannerObserver,
    http_fetch,
)
from lightspeed.protocol import PerfModel, WorkerCard
from lightspeed.runtime.discovery import Discovery
from lightspeed.runtime.planes import discovery_from_config, subscriber_from_config

log = logging.getLogger(__name__)
ConnectorKind = Literal["local", "kubernetes", "virtual"]
DEFAULT_KV_TOKENS = 16384 * 64  # the mocker's default cache, for a planner that sees no cards
CARD_WAIT_S = 10.0


@dataclass(frozen=True)
class PlannerProcessConfig:
    """`lightspeed planner`: the planner options plus where it observes and how it acts."""

    frontend_url: str = opt("http://127.0.0.1:8000", "frontend base URL (its /metrics is scraped)")
    connector: ConnectorKind = opt("virtual", "how decisions are applied")
    model: str = opt("", "observe only this served model ('' = all)", flag="--planner-model")
    follow_workers: bool = opt(True, "subscribe to the workers' forward-pass metrics (needs discovery)")
    virtual_dir: str = opt("planner-virtual", "virtual connector: folder of decisions.jsonl and ack.json")
    ack_timeout: float = opt(10.0, "virtual connector: seconds to wait for an acknowledgement")
    k8s_namespace: str = opt("default", "kubernetes connector: namespace of the worker Deployments")
    k8s_deployment: str = opt(
        "lightspeed-worker", "kubernetes connector: aggregated worker Deployment(s), comma-separated"
    )
    k8s_host: str = opt("", "kubernetes connector: API server URL ('' = in-cluster or ~/.kube/config)")
    metrics_host: str = opt("127.0.0.1", "address of the planner's /metrics server")
    planes: PlaneConfig = PlaneConfig()  # noqa: RUF009 (frozen: a shared default is safe)
    planner: PlannerOptions = PlannerOptions()  # noqa: RUF009

    def __post_init__(self) -> None:
        if not self.frontend_url.startswith(("http://", "https://")):
            raise ValueError(f"frontend_url must be an http(s) URL; got {self.frontend_url!r}")
        if self.connector == "local":
            raise ValueError(
                "connector local scales the workers of `lightspeed serve`: run `lightspeed serve --planner`"
            )

    def settings(self) -> ConnectorSettings:
        names = tuple(n.strip() for n in self.k8s_deployment.split(",") if n.strip())
        return ConnectorSettings(self.virtual_dir, self.ack_timeout, self.k8s_namespace, names)


_HIDE = ("planner.enabled",)


def add_planner_args(parser: argparse.ArgumentParser) -> None:
    add_flags(parser, flag_specs(PlannerProcessConfig, _HIDE))


def planner_config(args: argparse.Namespace) -> PlannerProcessConfig:
    specs = flag_specs(PlannerProcessConfig, _HIDE)
    return build_config(PlannerProcessConfig, specs, resolve(specs, vars(args), os.environ, {}))


def planner_main(args: argparse.Namespace) -> int:
    """Run until SIGINT/SIGTERM. A bad option is a ValueError (the CLI exits 2)."""
    import uvloop

    try:
        cfg = planner_config(args)
    except ValueError as err:  # the CLI exits 2 on a configuration error
        raise ConfigError(str(err)) from None
    try:
        uvloop.run(_run_standalone(cfg))
    except ValueError as err:  # found while starting: an unreadable --perf-model, a bad connector setting
        raise ConfigError(str(err)) from None
    return 0


async def _run_standalone(cfg: PlannerProcessConfig) -> None:
    connector = make_connector(cfg.connector, cfg.settings(), None, cfg.k8s_host)
    planes = cfg.planes if cfg.follow_workers else None
    running = await open_planner(cfg.planner, cfg.frontend_url, connector, planes, cfg.model or None, cfg.metrics_host)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await running.service.run(stop)
    finally:
        await running.close()


# ------------------------------------------------------------------ shared wiring


def read_perf_model(path: str) -> PerfModel:
    """A PerfModel JSON, or a `lightspeed profile` output file (its fitted model)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise ValueError(f"perf_model: cannot read {path}: {err.strerror or err}") from None
    try:
        return msgspec.json.decode(raw, type=PerfModel)
    except msgspec.DecodeError:
        from lightspeed.planner.profiler import load_perf_model

        return load_perf_model(path)


def is_worker(card: WorkerCard) -> bool:
    """Engine workers serve a model at a request-plane address; routers (replica sync) register
    cards of their own with neither."""
    return bool(card.address and card.model)


async def fleet_cards(discovery: Discovery | None, wait_s: float = CARD_WAIT_S) -> list[WorkerCard]:
    """The workers' cards, waiting a while for the first one (a fleet that is still starting)."""
    if discovery is None:
        return []
    deadline = asyncio.get_running_loop().time() + wait_s
    while True:
        cards = [c for c in await discovery.list_cards() if is_worker(c)]
        if cards or asyncio.get_running_loop().time() >= deadline:
            return cards
        await asyncio.sleep(0.25)


def engine_limits(cards: list[WorkerCard]) -> EngineLimits:
    """The smallest worker's cache and batch limit (a pool is sized by its weakest engine)."""
    if not cards:
        return EngineLimits(DEFAULT_KV_TOKENS)
    kv = min(max(1, c.total_kv_blocks * c.block_size) for c in cards)
    return EngineLimits(kv, min(c.max_num_seqs for c in cards))


def perf_model_for(opts: PlannerOptions, cards: list[WorkerCard]) -> PerfModel:
    if opts.perf_model:
        return read_perf_model(opts.perf_model)
    published = [c.perf for c in cards if c.perf is not None]
    if published:
        return published[0]
    log.warning("planner: no --perf-model and no worker publishes one; using Dynamo's default fit")
    return PerfModel.dynamo_default()


@dataclass
class RunningPlanner:
    service: PlannerService
    session: aiohttp.ClientSession
    follower: ForwardPassFollower | None
    metrics_runner: web.AppRunner | None

    async def close(self) -> None:
        if self.follower is not None:
            await self.follower.stop()
        if self.metrics_runner is not None:
            await self.metrics_runner.cleanup()
        await self.service.connector.close()
        await self.session.close()


async def open_planner(
    opts: PlannerOptions,
    frontend_url: str,
    connector: Connector,
    planes: PlaneConfig | None,
    model: str | None = None,
    metrics_host: str = "127.0.0.1",
    headers: dict[str, str] | None = None,
) -> RunningPlanner:
    """Build a planner ready to `service.run(stop)`; the caller closes it. `headers` go with
    every scrape of the frontend (an API key when its /metrics is not public)."""
    discovery = discovery_from_config(planes) if planes is not None else None
    cards = await fleet_cards(discovery)
    config = PlannerConfig(
        SlaTarget(opts.ttft_slo, opts.itl_slo),
        Budget(opts.max_workers, opts.min_workers),
        engine_limits(cards),
        opts.mode,
        opts.predictor,
        opts.target_utilization,
    )
    current = await connector.current()
    model_perf = perf_model_for(opts, cards)
    planner = Planner(config, model_perf, current if current is not None else opts.min_workers)
    log.info(
        "planner: %d worker cards; sizing engines of %d KV tokens, %d sequences; step model %s",
        len(cards),
        config.limits.kv_capacity_tokens,
        config.limits.max_num_seqs,
        model_perf,
    )
    follower = None
    aggregator = ForwardPassAggregator()
    if discovery is not None and planes is not None:
        from lightspeed.protocol import TOPIC_FORWARD_PASS

        follower = ForwardPassFollower(discovery, subscriber_from_config(planes, [TOPIC_FORWARD_PASS]), aggregator)
        await follower.start()
    session = aiohttp.ClientSession(headers=headers, connector=aiohttp.TCPConnector(ssl=False))
    observer = PlannerObserver(
        FrontendObserver(http_fetch(session, frontend_url.rstrip("/") + "/metrics"), model),
        aggregator if follower is not None else None,
    )
    metrics = PlannerMetrics()
    runner = await serve_metrics(metrics, metrics_host, opts.metrics_port) if opts.metrics_port else None
    service = PlannerService(
        planner,
        observer.observe,
        connector,
        interval_s=opts.adjustment_interval,
        dry_run=opts.dry_run,
        decision_log=opts.decision_log or None,
        metrics=metrics,
    )
    return RunningPlanner(service, session, follower, runner)


async def run_planner_until(running: RunningPlanner, stop: asyncio.Event) -> None:
    """Run the loop until `stop`; a crash in the loop is logged, never raised into `serve`."""
    try:
        await running.service.run(stop)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("planner loop failed; the fleet keeps its current size")
    finally:
        with contextlib.suppress(Exception):
            await running.close()
