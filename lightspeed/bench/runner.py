"""Load generation: closed loop (fixed concurrency) and open loop (arrival replay).

One asyncio process drives all requests; with uvloop and aiohttp a single core sustains a few
thousand short streaming requests per second, so the client is rarely the bottleneck. The
open loop reports how late it dispatched, which exposes the case where it is.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from time import perf_counter

import aiohttp
from tqdm import tqdm

from lightspeed.bench.client import (
    OpenAIClient,
    RequestResult,
    completions_url,
    fetch_models,
    make_session,
)
from lightspeed.bench.config import BenchConfig
from lightspeed.bench.report import BenchReport, write_report
from lightspeed.bench.stats import summarize, time_series
from lightspeed.bench.traces import TraceWindow, load_trace
from lightspeed.bench.workload import (
    RequestSpec,
    SyntheticWorkload,
    TokenSpace,
    Workload,
)

logger = logging.getLogger(__name__)

OnDone = Callable[[RequestResult], None]


def build_workload(cfg: BenchConfig) -> Workload:
    """The request source for `cfg`, warmup requests included at its head."""
    tokens = TokenSpace(cfg.vocab_size, cfg.min_token_id)
    total = None if cfg.num_requests is None else cfg.warmup + cfg.num_requests
    if cfg.trace is None:
        count = None if cfg.duration_s is not None else total
        return SyntheticWorkload(cfg.isl, cfg.osl, count, cfg.shared_prefix_ratio, cfg.request_rate, cfg.seed, tokens)
    window = TraceWindow(cfg.trace_start_s, cfg.trace_window_s, total, cfg.max_output_tokens)
    return load_trace(cfg.trace, cfg.trace_format, seed=cfg.seed, tokens=tokens, window=window)


async def closed_loop(
    client: OpenAIClient,
    specs: Iterator[RequestSpec],
    concurrency: int,
    deadline: float | None,
    on_done: OnDone,
) -> list[RequestResult]:
    """Keep `concurrency` requests in flight until `specs` runs out or `deadline` passes."""
    results: list[RequestResult] = []

    async def user() -> None:
        while deadline is None or perf_counter() < deadline:
            spec = next(specs, None)
            if spec is None:
                return
            result = await client.send(spec)
            results.append(result)
            on_done(result)

    await asyncio.gather(*(user() for _ in range(concurrency)))
    return results


async def open_loop(
    client: OpenAIClient,
    specs: Iterator[RequestSpec],
    speedup: float,
    max_in_flight: int,
    deadline: float | None,
    on_done: OnDone,
) -> tuple[list[RequestResult], float]:
    """Send each spec at its arrival offset / speedup (the first one at once); returns the
    results and the worst dispatch lag behind schedule in seconds."""
    results: list[RequestResult] = []
    slots = asyncio.Semaphore(max_in_flight) if max_in_flight > 0 else None
    tasks: set[asyncio.Task[None]] = set()
    start = perf_counter()
    base: float | None = None
    max_lag = 0.0

    async def fire(spec: RequestSpec) -> None:
        try:
            result = await client.send(spec)
        finally:
            if slots is not None:
                slots.release()
        results.append(result)
        on_done(result)

    for spec in specs:
        base = spec.arrival_s if base is None else base
        due = start + (spec.arrival_s - base) / speedup
        if deadline is not None and due >= deadline:
            break
        delay = due - perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if slots is not None:
            await slots.acquire()
        max_lag = max(max_lag, perf_counter() - due)
        task = asyncio.create_task(fire(spec))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)
    return results, max_lag


async def _resolve_model(cfg: BenchConfig, session: aiohttp.ClientSession) -> str:
    if cfg.model:
        return cfg.model
    models = await fetch_models(session, cfg.url)
    if not models:
        raise RuntimeError(f"{cfg.url} lists no models; pass --model")
    return models[0]


async def _measure(
    cfg: BenchConfig, client: OpenAIClient, specs: Iterator[RequestSpec], bar: tqdm
) -> tuple[list[RequestResult], float, float]:
    """Run the measured phase; returns results, wall duration and worst dispatch lag."""
    client.t0 = perf_counter()
    deadline = None if cfg.duration_s is None else client.t0 + cfg.duration_s
    on_done: OnDone = lambda _r: bar.update(1)  # noqa: E731 -- a one-call adapter reads better inline than a def
    lag = 0.0
    if cfg.resolved_mode == "closed":
        results = await closed_loop(client, specs, cfg.concurrency, deadline, on_done)
    else:
        results, lag = await open_loop(client, specs, cfg.speedup, cfg.concurrency, deadline, on_done)
    end = max((r.start_s + r.e2e_s for r in results), default=perf_counter() - client.t0)
    return results, max(end, 1e-9), lag


async def run_bench(cfg: BenchConfig) -> BenchReport:
    """Run one benchmark against `cfg.url` and return (and, with out_dir, write) its report."""
    workload = build_workload(cfg)
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    async with make_session(cfg.concurrency, cfg.timeout_s, cfg.keepalive) as session:
        model = await _resolve_model(cfg, session)
        url = completions_url(cfg.url, cfg.endpoint)
        client = OpenAIClient(session, url, model, cfg.api_key, cfg.ignore_eos, cfg.session_ids)
        specs = iter(workload)
        if cfg.warmup:
            logger.info("warmup: %d requests", cfg.warmup)
            warm = itertools.islice(specs, cfg.warmup)
            await closed_loop(client, warm, max(1, cfg.concurrency), None, lambda _r: None)
        total = None if workload.size is None else max(0, workload.size - cfg.warmup)
        with tqdm(total=total, disable=not cfg.progress, unit="req", mininterval=0.5) as bar:
            results, duration, lag = await _measure(cfg, client, specs, bar)
    report = BenchReport(
        label=cfg.label,
        url=cfg.url,
        model=model,
        mode=cfg.resolved_mode,
        started_at=started_at,
        config=cfg,
        summary=summarize(results, duration),
        timeseries=time_series(results, bucket_s=max(duration / 200, 0.1)),
        max_dispatch_lag_s=lag,
    )
    if cfg.out_dir:
        write_report(report, results, cfg.out_dir, cfg.save_requests)
    return report
