"""Routing quality on the Mooncake trace: Lightspeed's routers vs Dynamo 1.6.1's, same client.

For each policy in `--policies` (ls-rr, ls-kv, ls-kv-latency: `lightspeed serve --engine mocker
--router-mode round-robin|kv|kv-latency`; dyn-kv, dyn-rr: Dynamo's frontend `--router-mode
kv|round-robin` over `dynamo.mocker`), this starts the system fresh with N mocker workers and the
same engine parameters (block size, KV blocks, speedup ratio, max seqs, token budget, context
length), waits until every worker is registered, replays the same Mooncake trace slice with
`lightspeed.bench` (open loop, same seed, same compression), samples the frontends' load gauges,
stops the system, and keeps the bench report. One combined JSON (command line, parameters, the
offered load, each policy's summary, TTFT CDF, ratios against Dynamo's kv router and round-robin,
the calibration check rr-vs-rr) and a PNG go to bench/results/.

Run from the repo root (final numbers under the bench lock):
  flock /tmp/lightspeed-bench.lock .venv/bin/python bench/routing_quality.py \
      --policies ls-rr,dyn-rr,ls-kv,ls-kv-latency,dyn-kv
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import shlex
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp
import msgspec
from harness import (
    RESULTS,
    WORK,
    Script,
    Service,
    dynamo_service,
    free_port,
    lightspeed_serve,
    main,
    poll_until,
    pyplot,
)

from lightspeed.bench import BenchConfig, run_bench
from lightspeed.bench.report import BenchReport
from lightspeed.bench.stats import BenchSummary, Distribution, percentile
from lightspeed.bench.traces import TraceWindow, load_mooncake
from lightspeed.config import ROUTER_MODES
from lightspeed.protocol import DEFAULT_PERF_MODEL

logger = logging.getLogger("routing_quality")

# policy -> (system, router mode)
POLICIES: dict[str, tuple[str, str]] = {
    "ls-rr": ("lightspeed", "round-robin"),
    "ls-kv": ("lightspeed", "kv"),
    "ls-kv-latency": ("lightspeed", "kv-latency"),
    "dyn-kv": ("dynamo", "kv"),
    "dyn-rr": ("dynamo", "round-robin"),
}
OURS_SMART = ("ls-kv", "ls-kv-latency")
COLORS = {
    "ls-rr": "tab:cyan",
    "ls-kv": "tab:blue",
    "ls-kv-latency": "tab:purple",
    "dyn-kv": "tab:orange",
    "dyn-rr": "tab:brown",
}
TRACE = Path("/work/shared/traces/mooncake_synthetic_trace.jsonl")
READY_TIMEOUT_S = 180.0
SAMPLE_EVERY_S = 1.0
CALIBRATION_TOLERANCE = 0.15
CDF_POINTS = 201


@dataclass(frozen=True, slots=True)
class Params:
    workers: int = 4
    speedup_ratio: float = 1.0  # mocker: modelled step times / this
    block_size: int = 64
    num_gpu_blocks: int = 16384
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    # Mooncake's longest prompt + output is 192,271 tokens: both systems get room for all of it.
    max_model_len: int = 200000
    trace_speedup: float = 2.0  # client: trace inter-arrival times / this
    # Late in the trace, where most prompts reuse earlier prefixes (a perfect cache hits 52%
    # of this slice from cold, 15% of the first 800 requests).
    trace_start: float = 700.0  # trace seconds
    num_requests: int = 800
    max_output_tokens: int = 0  # 0 = the trace's output lengths
    seed: int = 0
    timeout: float = 600.0
    # A fresh connection per request: on a reused one Dynamo 1.6.1's frontend delays the first
    # chunk by up to ~40 ms (Nagle vs delayed ACK, see bench/README.md), which is no part of
    # routing quality.
    keepalive: bool = False
    frontend_processes: int = 1  # ours: `--frontend-processes` (SO_REUSEPORT frontends)

    def __post_init__(self) -> None:
        for name in ("workers", "block_size", "num_gpu_blocks", "max_num_seqs", "num_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.speedup_ratio <= 0 or self.trace_speedup <= 0 or self.timeout <= 0:
            raise ValueError("speedup_ratio, trace_speedup and timeout must be > 0")
        if self.max_num_batched_tokens < self.block_size or self.max_model_len < 1:
            raise ValueError("max_num_batched_tokens must be >= block_size; max_model_len >= 1")
        if self.trace_start < 0 or self.max_output_tokens < 0:
            raise ValueError("trace_start and max_output_tokens must be >= 0")


# ---------------------------------------------------------------------------- services


def _engine_flags(p: Params) -> dict[str, object]:
    """Flags both mockers spell the same way."""
    return {
        "--speedup-ratio": p.speedup_ratio,
        "--block-size": p.block_size,
        "--max-num-seqs": p.max_num_seqs,
        "--max-num-batched-tokens": p.max_num_batched_tokens,
        "--max-model-len": p.max_model_len,
    }


def lightspeed_service(policy: str, mode: str, p: Params, log_dir: Path, tmp: Path) -> Service:
    port = free_port()
    discovery = tmp / f"{policy}-discovery"
    discovery.mkdir()
    serve_flags: dict[str, object] = {
        "--workers": p.workers,
        **_engine_flags(p),
        "--num-gpu-blocks": p.num_gpu_blocks,
        "--seed": p.seed,
        "--router-mode": mode,
        "--frontend-processes": p.frontend_processes,
        "--host": "127.0.0.1",
        "--port": port,
        "--discovery-path": discovery,
    }
    return lightspeed_serve(policy, "mocker", port, serve_flags, log_dir)


def dynamo_mocker_service(
    policy: str, mode: str, p: Params, log_dir: Path, tmp: Path, args: argparse.Namespace
) -> Service:
    kv_dir = tmp / f"{policy}-kv"
    kv_dir.mkdir()
    mocker_flags: dict[str, object] = {
        "--model-path": args.dynamo_model_dir,
        "--model-name": args.model_name,
        "--num-workers": p.workers,
        **_engine_flags(p),
        "--num-gpu-blocks-override": p.num_gpu_blocks,
    }
    return dynamo_service(policy, log_dir, kv_dir, Path(args.dynamo_venv), mode, mocker_flags)


def build_service(policy: str, p: Params, log_dir: Path, tmp: Path, args: argparse.Namespace) -> Service:
    system, mode = POLICIES[policy]
    if system == "lightspeed":
        return lightspeed_service(policy, mode, p, log_dir, tmp)
    return dynamo_mocker_service(policy, mode, p, log_dir, tmp, args)


def registered_workers(system: str, health: dict[str, object]) -> int:
    """Workers a frontend's /health lists (both answer JSON, in their own shapes)."""
    if system == "lightspeed":
        return len(health.get("workers") or [])  # type: ignore[arg-type]
    instances = health.get("instances") or []
    return sum(1 for i in instances if i.get("endpoint") == "generate")  # type: ignore[union-attr]


async def wait_ready(service: Service, system: str, workers: int) -> None:
    """Poll /health until every worker is registered and /v1/models lists a model."""

    async def ready(session: aiohttp.ClientSession) -> bool | None:
        async with session.get(service.url + "/health") as resp:
            health = await resp.json(content_type=None) if resp.status == 200 else {}
        async with session.get(service.url + "/v1/models") as resp:
            models = (await resp.json()).get("data", []) if resp.status == 200 else []
        return True if models and registered_workers(system, health) >= workers else None

    failure = f"{service.name}: {workers} workers not ready in {READY_TIMEOUT_S} s"
    await poll_until(service, ready, READY_TIMEOUT_S, failure)


# ---------------------------------------------------------------------------- load sampling

# Gauges each frontend exposes on /metrics: requests in flight, and KV blocks in use per worker
# (Lightspeed: the workers' own count; Dynamo: its router's count, present in kv mode only).
INFLIGHT_GAUGE = {
    "lightspeed": "lightspeed_frontend_inflight_requests",
    "dynamo": "dynamo_frontend_inflight_requests",
}
ACTIVE_BLOCKS_GAUGE = {
    "lightspeed": "lightspeed_worker_kv_active_blocks",
    "dynamo": "dynamo_frontend_worker_active_decode_blocks",
}
_SAMPLE_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$", re.M)


def gauge_values(text: str, name: str) -> list[float]:
    """Every sample of a gauge in a Prometheus text page (one per label set)."""
    return [float(v) for n, _labels, v in _SAMPLE_LINE.findall(text) if n == name]


def gauge_sum(text: str, name: str) -> float | None:
    """Sum of a gauge over its label sets in a Prometheus text page; None if absent."""
    values = gauge_values(text, name)
    return sum(values) if values else None


class LoadSample(msgspec.Struct):
    t_s: float
    inflight: float | None
    kv_usage: float | None  # active blocks over all workers / (workers * blocks per worker)


class LoadStats(msgspec.Struct):
    samples: int
    inflight_mean: float | None
    inflight_max: float | None
    kv_usage_mean: float | None
    kv_usage_max: float | None
    kv_usage_source: str


async def sample_load(url: str, system: str, capacity_blocks: int, out: list[LoadSample]) -> None:
    """Poll /metrics every second until cancelled."""
    t0 = time.monotonic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while True:
            try:
                async with session.get(url + "/metrics") as resp:
                    text = await resp.text()
                active = gauge_sum(text, ACTIVE_BLOCKS_GAUGE[system])
                usage = None if active is None else active / capacity_blocks
                inflight = gauge_sum(text, INFLIGHT_GAUGE[system])
                out.append(LoadSample(time.monotonic() - t0, inflight, usage))
            except (TimeoutError, aiohttp.ClientError, ValueError):
                pass
            await asyncio.sleep(SAMPLE_EVERY_S)


def _mean_max(values: list[float]) -> tuple[float | None, float | None]:
    return (sum(values) / len(values), max(values)) if values else (None, None)


def load_stats(samples: list[LoadSample], system: str) -> LoadStats:
    inflight = [s.inflight for s in samples if s.inflight is not None]
    usage = [s.kv_usage for s in samples if s.kv_usage is not None]
    source = "workers' active blocks" if system == "lightspeed" else "router's active decode blocks"
    return LoadStats(len(samples), *_mean_max(inflight), *_mean_max(usage), source)


# ---------------------------------------------------------------------------- one policy


class PolicyResult(msgspec.Struct):
    policy: str
    system: str
    router_mode: str
    server_commands: list[str]
    summary: BenchSummary
    ttft_p50_ms: float | None
    ttft_p90_ms: float | None
    ttft_p99_ms: float | None
    itl_p50_ms: float | None
    tpot_p50_ms: float | None
    e2e_p50_ms: float | None
    e2e_p90_ms: float | None
    prefix_cache_hit_rate: float | None
    max_dispatch_lag_s: float
    load: LoadStats
    ttft_cdf_ms: list[float]  # TTFT at quantiles 0, 0.5, ..., 100 % of completed requests
    # TTFT p90 of each quarter of the run (by send time): flat = loaded but stable, rising
    # steeply = a queue that grows without bound.
    ttft_p90_by_quarter_ms: list[float]


def _ms(dist: Distribution | None, field: str) -> float | None:
    return None if dist is None else getattr(dist, field) * 1e3


def read_ttfts(requests_file: Path) -> list[tuple[float, float]]:
    """(send time s, TTFT ms) of each successful request in the client's per-request dump."""
    decoder = msgspec.json.Decoder(dict[str, object])
    rows = (decoder.decode(line) for line in requests_file.read_bytes().splitlines() if line.strip())
    return sorted(
        (float(r["start_s"]), float(r["ttft_s"]) * 1e3)  # type: ignore[arg-type]
        for r in rows
        if r.get("ttft_s") is not None and r.get("error") is None
    )


def ttft_cdf(ttfts: list[tuple[float, float]]) -> list[float]:
    ordered = sorted(t for _start, t in ttfts)
    if not ordered:
        return []
    return [percentile(ordered, 100.0 * i / (CDF_POINTS - 1)) for i in range(CDF_POINTS)]


def p90_by_quarter(ttfts: list[tuple[float, float]]) -> list[float]:
    n = len(ttfts)
    quarters = [sorted(t for _s, t in ttfts[i * n // 4 : (i + 1) * n // 4]) for i in range(4)]
    return [percentile(q, 90) for q in quarters if q]


def bench_config(url: str, p: Params, policy: str, out_dir: Path) -> BenchConfig:
    return BenchConfig(
        url=url,
        trace=str(TRACE),
        trace_format="mooncake",
        speedup=p.trace_speedup,
        trace_start_s=p.trace_start,
        num_requests=p.num_requests,
        max_output_tokens=p.max_output_tokens or None,
        concurrency=0,  # open loop, no in-flight cap: arrivals follow the trace
        seed=p.seed,
        timeout_s=p.timeout,
        keepalive=p.keepalive,
        progress=False,
        label=policy,
        out_dir=str(out_dir),
        save_requests=True,
    )


async def measure(service: Service, system: str, p: Params, out_dir: Path) -> tuple[BenchReport, LoadStats]:
    samples: list[LoadSample] = []
    capacity = p.workers * p.num_gpu_blocks
    sampler = asyncio.create_task(sample_load(service.url, system, capacity, samples))
    try:
        report = await run_bench(bench_config(service.url, p, service.name, out_dir))
    finally:
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
    return report, load_stats(samples, system)


async def run_policy(policy: str, p: Params, args: argparse.Namespace, tmp: Path) -> PolicyResult:
    system, mode = POLICIES[policy]
    log_dir = Path(args.work_dir) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    service = build_service(policy, p, log_dir, tmp, args)
    out_dir = Path(args.work_dir) / policy
    try:
        service.start()
        await wait_ready(service, system, p.workers)
        logger.info("%s: %d workers ready; replaying", policy, p.workers)
        report, load = await measure(service, system, p, out_dir)
    finally:
        service.stop()
    s = report.summary
    ttfts = read_ttfts(out_dir / "requests.jsonl")
    result = PolicyResult(
        policy,
        system,
        mode,
        [shlex.join(c) for c in service.commands],
        s,
        _ms(s.ttft_s, "p50"),
        _ms(s.ttft_s, "p90"),
        _ms(s.ttft_s, "p99"),
        _ms(s.itl_s, "p50"),
        _ms(s.tpot_s, "p50"),
        _ms(s.e2e_s, "p50"),
        _ms(s.e2e_s, "p90"),
        s.prefix_cache_hit_rate,
        report.max_dispatch_lag_s,
        load,
        ttft_cdf(ttfts),
        p90_by_quarter(ttfts),
    )
    logger.info(
        "%s: TTFT p50 %.0f p90 %.0f ms, hit %.3f, %d ok / %d failed, inflight mean %s",
        policy,
        result.ttft_p50_ms or 0,
        result.ttft_p90_ms or 0,
        result.prefix_cache_hit_rate or 0,
        s.completed,
        s.failed,
        load.inflight_mean,
    )
    return result


# ---------------------------------------------------------------------------- offered load


class OfferedLoad(msgspec.Struct):
    requests: int
    trace_span_s: float  # trace time the slice covers
    replay_span_s: float  # after compression
    req_per_s: float
    prompt_tok_per_s: float
    output_tok_per_s: float  # if every output were produced on schedule
    mean_input_tokens: float
    max_input_tokens: int
    perfect_cache_hit_rate: float  # infinite cache shared by all workers, in trace order
    unloaded_ttft_no_cache_ms: dict[str, float]  # modelled, one request alone on a worker
    unloaded_ttft_perfect_cache_ms: dict[str, float]


def modelled_ttft_ms(uncached: int, total_tokens: int, p: Params) -> float:
    """One request alone on an idle worker: its uncached tokens in token-budget chunks, the
    last chunk also paying the decode phase that emits the first token."""
    full, rest = divmod(max(uncached, 1), p.max_num_batched_tokens)
    ms = full * DEFAULT_PERF_MODEL.prefill_ms(p.max_num_batched_tokens) + DEFAULT_PERF_MODEL.prefill_ms(rest)
    usage = -(-total_tokens // p.block_size) / p.num_gpu_blocks
    return (ms + DEFAULT_PERF_MODEL.decode_ms(usage)) / p.speedup_ratio


def _quantiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {f"p{q}": percentile(ordered, q) for q in (50, 90, 99)}


def offered_load(p: Params) -> OfferedLoad:
    window = TraceWindow(p.trace_start, None, p.num_requests, p.max_output_tokens or None)
    trace = load_mooncake(TRACE, window=window)
    seen: set[int] = set()
    hits = inputs = 0
    no_cache, perfect = [], []
    for row in trace.rows:
        shared = next((i for i, h in enumerate(row.hash_ids) if h not in seen), len(row.hash_ids))
        cached = min(shared * 512, row.input_length)
        seen.update(row.hash_ids)
        hits += cached
        inputs += row.input_length
        no_cache.append(modelled_ttft_ms(row.input_length, row.input_length, p))
        perfect.append(modelled_ttft_ms(row.input_length - cached, row.input_length, p))
    span = max(trace.arrivals) - min(trace.arrivals) if trace.rows else 0.0
    replay = max(span / p.trace_speedup, 1e-9)
    outputs = sum(window.output_tokens(r.output_length) for r in trace.rows)
    return OfferedLoad(
        len(trace.rows),
        span,
        replay,
        len(trace.rows) / replay,
        inputs / replay,
        outputs / replay,
        inputs / max(1, len(trace.rows)),
        max((r.input_length for r in trace.rows), default=0),
        hits / max(1, inputs),
        _quantiles(no_cache),
        _quantiles(perfect),
    )


# ---------------------------------------------------------------------------- comparison


class Calibration(msgspec.Struct):
    ttft_p50_ratio: float  # ls-rr / dyn-rr
    ttft_p90_ratio: float
    tolerance: float
    passed: bool


class Comparison(msgspec.Struct):
    best_ours: str | None
    best_ours_vs_dyn_kv_ttft_p90: float | None  # target <= 0.8
    best_ours_hit_rate: float | None
    dyn_kv_hit_rate: float | None  # target: ours >= this
    rr_vs_best_ours_ttft_p90: float | None  # ls-rr p90 / best ours p90; target >= 2
    dyn_rr_vs_dyn_kv_ttft_p90: float | None  # Dynamo's own kv gain, for context
    targets: dict[str, bool | None]


def _by_policy(results: list[PolicyResult]) -> dict[str, PolicyResult]:
    return {r.policy: r for r in results}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def calibration(results: list[PolicyResult]) -> Calibration | None:
    by = _by_policy(results)
    ours, dyn = by.get("ls-rr"), by.get("dyn-rr")
    if ours is None or dyn is None:
        return None
    r50 = _ratio(ours.ttft_p50_ms, dyn.ttft_p50_ms) or float("nan")
    r90 = _ratio(ours.ttft_p90_ms, dyn.ttft_p90_ms) or float("nan")
    ok = all(abs(r - 1.0) <= CALIBRATION_TOLERANCE for r in (r50, r90))
    return Calibration(r50, r90, CALIBRATION_TOLERANCE, ok)


def comparison(results: list[PolicyResult]) -> Comparison:
    by = _by_policy(results)
    smart = [by[p] for p in OURS_SMART if p in by and by[p].ttft_p90_ms is not None]
    best = min(smart, key=lambda r: r.ttft_p90_ms or float("inf")) if smart else None
    dyn_kv, ls_rr, dyn_rr = by.get("dyn-kv"), by.get("ls-rr"), by.get("dyn-rr")
    vs_dyn = _ratio(best and best.ttft_p90_ms, dyn_kv and dyn_kv.ttft_p90_ms)
    best_hit = best.prefix_cache_hit_rate if best else None
    dyn_hit = dyn_kv.prefix_cache_hit_rate if dyn_kv else None
    rr_gain = _ratio(ls_rr and ls_rr.ttft_p90_ms, best and best.ttft_p90_ms)
    targets = {
        "ttft_p90_le_0.8x_dyn_kv": None if vs_dyn is None else vs_dyn <= 0.8,
        "hit_rate_ge_dyn_kv": None if best_hit is None or dyn_hit is None else best_hit >= dyn_hit,
        "ttft_p90_2x_better_than_rr": None if rr_gain is None else rr_gain >= 2.0,
    }
    return Comparison(
        best.policy if best else None,
        vs_dyn,
        best_hit,
        dyn_hit,
        rr_gain,
        _ratio(dyn_rr and dyn_rr.ttft_p90_ms, dyn_kv and dyn_kv.ttft_p90_ms),
        targets,
    )


# ---------------------------------------------------------------------------- report + plot


class RoutingReport(msgspec.Struct):
    params: dict[str, object]
    trace: str
    policies_requested: list[str]
    policies_skipped: dict[str, str]  # policy -> why
    offered_load: OfferedLoad
    results: list[PolicyResult]
    calibration: Calibration | None
    comparison: Comparison
    note: str


NOTE = (
    "Same client (lightspeed.bench, open loop, no in-flight cap, seed 0, a fresh connection per "
    "request unless keepalive) and the same Mooncake "
    "slice for every policy; each policy gets a freshly started system (empty KV caches). "
    "Both systems run N mocker workers with the same block size, KV blocks, speedup ratio, "
    "max seqs, token budget and context length, and Dynamo's polynomial step-time model. "
    "Everything shares a 2-core machine, so CPU contention adds noise to every policy alike. "
    "kv_usage is read from each frontend's /metrics: Lightspeed's workers report blocks in use; "
    "Dynamo's frontend exposes its router's active decode blocks (kv mode only)."
)


def _plot_cdfs(ax, results: list[PolicyResult]) -> None:  # type: ignore[no-untyped-def]
    qs = [i / (CDF_POINTS - 1) for i in range(CDF_POINTS)]
    for r in results:
        if r.ttft_cdf_ms:
            ax.plot([v / 1e3 for v in r.ttft_cdf_ms], qs, label=r.policy, color=COLORS[r.policy])
    ax.set_xscale("log")
    ax.set_xlabel("TTFT (s, log)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("TTFT CDF")
    ax.grid(alpha=0.3)
    ax.legend()


def _plot_bars(ax, results: list[PolicyResult]) -> None:  # type: ignore[no-untyped-def]
    xs = range(len(results))
    p50 = [(r.ttft_p50_ms or 0) / 1e3 for r in results]
    p90 = [(r.ttft_p90_ms or 0) / 1e3 for r in results]
    ax.bar([x - 0.2 for x in xs], p50, 0.4, label="TTFT p50", color="tab:gray")
    bars = ax.bar([x + 0.2 for x in xs], p90, 0.4, label="TTFT p90", color=[COLORS[r.policy] for r in results])
    hits = [f"hit {r.prefix_cache_hit_rate or 0:.2f}" for r in results]
    ax.bar_label(bars, labels=hits, fontsize=8)
    ax.set_xticks(list(xs), [r.policy for r in results])
    ax.set_ylabel("seconds")
    ax.set_title("TTFT p50 / p90 (label: prefix cache hit rate)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()


def plot(report: RoutingReport, path: Path) -> None:
    plt = pyplot()
    if plt is None or not report.results:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    _plot_cdfs(left, report.results)
    _plot_bars(right, report.results)
    p, load = report.params, report.offered_load
    fig.suptitle(
        f"Mooncake slice: {load.requests} req at {load.req_per_s:.1f} req/s, "
        f"{load.prompt_tok_per_s / 1e3:.0f}k prompt tok/s; {p['workers']} mockers "
        f"x{p['speedup_ratio']:g}, block {p['block_size']}, {p['num_gpu_blocks']} blocks"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------- CLI


def select_policies(requested: list[str]) -> tuple[list[str], dict[str, str]]:
    """Keep the policies this checkout can run; ours need their router mode in the CLI."""
    chosen, skipped = [], {}
    for policy in requested:
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; known: {', '.join(POLICIES)}")
        system, mode = POLICIES[policy]
        if system == "lightspeed" and mode not in ROUTER_MODES:
            skipped[policy] = f"lightspeed serve has no --router-mode {mode} yet"
        else:
            chosen.append(policy)
    return chosen, skipped


async def run_all(policies: list[str], p: Params, args: argparse.Namespace) -> list[PolicyResult]:
    results = []
    with tempfile.TemporaryDirectory(prefix="ls-routing-") as tmp:
        for policy in policies:
            results.append(await run_policy(policy, p, args, Path(tmp)))
    return results


def requested_policies(args: argparse.Namespace) -> list[str]:
    return [s for s in args.policies.split(",") if s]


async def run(args: argparse.Namespace, p: Params) -> RoutingReport:
    requested = requested_policies(args)
    policies, skipped = select_policies(requested)
    for policy, why in skipped.items():
        logger.warning("skipping %s: %s", policy, why)
    results = await run_all(policies, p, args)
    return RoutingReport(
        asdict(p),
        str(TRACE),
        requested,
        skipped,
        offered_load(p),
        results,
        calibration(results),
        comparison(results),
        NOTE,
    )


def add_flags(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--policies", default=",".join(POLICIES), help=f"comma list, run in this order; known: {', '.join(POLICIES)}"
    )
    ap.add_argument("--dynamo-venv", default=str(WORK / "dynamo-venv"))
    ap.add_argument("--dynamo-model-dir", default=str(WORK / "dynamo-model"))
    ap.add_argument("--model-name", default="smollm2", help="name Dynamo's mocker serves")
    ap.add_argument(
        "--work-dir", default=str(WORK / "routing-quality"), help="per-policy bench reports and server logs"
    )


def check(args: argparse.Namespace, p: Params) -> Params:
    select_policies(requested_policies(args))  # unknown names are a usage error, before any run
    return p


def result_path(args: argparse.Namespace) -> Path:
    return RESULTS / "routing_quality.json"


def log_summary(report: RoutingReport) -> None:
    load = report.offered_load
    logger.info(
        "offered: %.2f req/s, %.0f prompt tok/s, perfect-cache hit %.3f",
        load.req_per_s,
        load.prompt_tok_per_s,
        load.perfect_cache_hit_rate,
    )
    for r in report.results:
        logger.info(
            "%-14s TTFT p50 %8.0f p90 %8.0f p99 %8.0f ms  hit %.3f  failed %d",
            r.policy,
            r.ttft_p50_ms or 0,
            r.ttft_p90_ms or 0,
            r.ttft_p99_ms or 0,
            r.prefix_cache_hit_rate or 0,
            r.summary.failed,
        )
    logger.info("calibration: %s", report.calibration)
    logger.info("comparison: %s", report.comparison)


SCRIPT = Script(
    name="routing_quality",
    doc=__doc__,
    params=Params,
    run=run,
    result_path=result_path,
    add_flags=add_flags,
    check=check,
    plot=plot,
    summarize=log_summary,
)


if __name__ == "__main__":
    raise SystemExit(main(SCRIPT))
