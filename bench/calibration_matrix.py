"""Mocker fleet calibration: Lightspeed's mocker fleet against Dynamo 1.6.1's, cell by cell.

Every fleet-scale result (routing, disaggregation, the planner, replay) rests on our mocker fleet
behaving like Dynamo's with the same timing model. Each cell of this matrix starts both systems
fresh with the same engine parameters and replays the same workload with the same client
(`lightspeed.bench`, open loop, fresh connections), once per policy:

  ls-rr / dyn-rr   round-robin on both: the engines alone (the calibration proper);
  ls-kv / dyn-kv   KV-aware routing on both (workloads with prefix reuse, `--kv-workloads`).

Workloads: `mooncake` (the Mooncake trace, prompts from its hash ids), `azure-code` and
`azure-conv` (Azure arrivals and lengths, random prompts), `multiturn` (lightspeed.bench.multiturn:
sessions resending growing histories). Axes: workers, mocker speedup, and offered load as a
fraction of the fleet's modelled capacity (`capacity_rps`; the client compresses or stretches the
trace's arrival times to hit it). `--design star` runs the centre of each axis list crossed with
every load, plus the other worker counts and speedups at the centre load; `full` runs them all.

Each cell records TTFT and ITL p50 / p90, prefix hit rate, failures, and for our fleet the step
clock (wall vs modelled seconds and the largest lag, from the frontend's /metrics), then ours /
Dynamo per metric; a cell is calibrated when rr vs rr is within `--tolerance` at p50 and p90.
Writes bench/results/calibration_matrix.json and a heat map (.png).

    flock /tmp/lightspeed-bench.lock .venv/bin/python bench/calibration_matrix.py
Smoke test (one tiny cell, rr only):  .venv/bin/python bench/calibration_matrix.py --smoke
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import logging
import math
import shlex
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import msgspec
import routing_quality as rq
from harness import WORK, Script, Service, Smoke, main, pyplot

from lightspeed.bench import BenchConfig, run_bench
from lightspeed.bench.multiturn import MultiTurnSpec, write_trace
from lightspeed.bench.stats import Distribution
from lightspeed.bench.traces import TraceWindow, load_azure, load_mooncake
from lightspeed.protocol import DEFAULT_PERF_MODEL

logger = logging.getLogger("calibration_matrix")

TRACES = Path(__file__).resolve().parents[2] / "shared" / "traces"
# name -> (file, format, trace second the replayed slice starts at)
WORKLOADS: dict[str, tuple[Path, str, float]] = {
    "mooncake": (TRACES / "mooncake_synthetic_trace.jsonl", "mooncake", 700.0),
    "azure-code": (TRACES / "azure_llm_inference_code_2023.csv", "azure", 0.0),
    "azure-conv": (TRACES / "azure_llm_inference_conv_2023.csv", "azure", 0.0),
    "multiturn": (WORK / "multiturn_trace.jsonl", "mooncake", 0.0),
}
POLICIES = ("ls-rr", "dyn-rr", "ls-kv", "dyn-kv", "ls-kv-latency")
DEFAULT_POLICIES = "ls-rr,dyn-rr,ls-kv,dyn-kv"


@dataclass(frozen=True, slots=True)
class Params:
    workloads: str = "mooncake,azure-code,azure-conv,multiturn"
    kv_workloads: str = "mooncake,multiturn"  # where the kv-vs-kv pair also runs
    workers: str = "2,4,8"
    speedups: str = "1,2,4"
    loads: str = "0.3,0.6,0.9"
    design: str = "star"  # star | full
    # Explicit cells instead of a design: "workload:workers:speedup:load" separated by commas.
    cells: str = ""
    requests: int = 240  # per cell and policy
    max_output_tokens: int = 128  # cap on the traces' output lengths
    block_size: int = 64
    num_gpu_blocks: int = 16384
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 200000
    tolerance: float = 0.10
    frontend_processes: int = 1  # ours; Dynamo's frontend is one multi-threaded process
    # High-rate cells: measure at least this many seconds (more requests than `requests`), so
    # p90 is not decided by a 2-second burst; 0 = always `requests`.
    min_seconds: float = 0.0
    warmup: int = 0  # requests sent one at a time before the measured ones (not counted)
    seed: int = 0
    timeout: float = 600.0

    def __post_init__(self) -> None:
        if self.design not in ("star", "full"):
            raise ValueError("design must be star or full")
        unknown = set(self.workload_list + _split(self.kv_workloads)) - set(WORKLOADS)
        if unknown:
            raise ValueError(f"unknown workloads {sorted(unknown)}; known: {', '.join(WORKLOADS)}")
        if not (self.worker_list and self.speedup_list and self.load_list):
            raise ValueError("workers, speedups and loads must be non-empty comma lists")
        if min(self.worker_list) < 1 or min(self.speedup_list) <= 0 or not all(x > 0 for x in self.load_list):
            raise ValueError("workers >= 1, speedups > 0 and loads > 0 required")
        explicit_cells(self.cells)  # a malformed list is a usage error before anything runs
        if self.min_seconds < 0 or self.warmup < 0:
            raise ValueError("min_seconds and warmup must be >= 0")
        if self.requests < 1 or self.max_output_tokens < 1 or self.tolerance <= 0:
            raise ValueError("requests, max_output_tokens and tolerance must be positive")

    @property
    def workload_list(self) -> list[str]:
        return _split(self.workloads)

    @property
    def worker_list(self) -> list[int]:
        return [int(x) for x in _split(self.workers)]

    @property
    def speedup_list(self) -> list[float]:
        return [float(x) for x in _split(self.speedups)]

    @property
    def load_list(self) -> list[float]:
        return [float(x) for x in _split(self.loads)]


def _split(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def _centre(values: list[float] | list[int]) -> float:
    return sorted(values)[len(values) // 2]


@dataclass(frozen=True, slots=True)
class Cell:
    workload: str
    workers: int
    speedup: float
    load: float

    @property
    def label(self) -> str:
        return f"{self.workload} w{self.workers} s{self.speedup:g} l{self.load:g}"


def explicit_cells(text: str) -> list[Cell]:
    out = []
    for item in _split(text):
        parts = item.split(":")
        if len(parts) != 4 or parts[0] not in WORKLOADS:
            raise ValueError(f"a cell is workload:workers:speedup:load, got {item!r}")
        out.append(Cell(parts[0], int(parts[1]), float(parts[2]), float(parts[3])))
    return out


def cells(p: Params) -> list[Cell]:
    """The cells to run, per workload: the full cross product, or a star around the centre."""
    if p.cells:
        return explicit_cells(p.cells)
    out: list[Cell] = []
    for wl in p.workload_list:
        if p.design == "full":
            grid = itertools.product(p.worker_list, p.speedup_list, p.load_list)
            out += [Cell(wl, w, s, x) for w, s, x in grid]
            continue
        w0, s0, x0 = int(_centre(p.worker_list)), _centre(p.speedup_list), _centre(p.load_list)
        star = [(w0, s0, x) for x in p.load_list]
        star += [(w, s0, x0) for w in p.worker_list if w != w0]
        star += [(w0, s, x0) for s in p.speedup_list if s != s0]
        out += [Cell(wl, w, s, x) for w, s, x in star]
    return out


# ---------------------------------------------------------------------------- offered load


class WorkloadStats(msgspec.Struct):
    requests: int
    span_s: float  # trace seconds the slice covers
    mean_input_tokens: float
    mean_output_tokens: float  # after the cap
    trace_rps: float


def _rows(name: str, window: TraceWindow) -> list[tuple[float, int, int]]:
    """(arrival s, prompt tokens, output tokens after the cap) of each request in the slice."""
    path, fmt, _start = WORKLOADS[name]
    if fmt == "azure":
        azure = load_azure(path, window=window)
        return [(r.arrival_s, r.context_tokens, window.output_tokens(r.generated_tokens)) for r in azure.rows]
    moon = load_mooncake(path, window=window)
    return [
        (a, r.input_length, window.output_tokens(r.output_length))
        for r, a in zip(moon.rows, moon.arrivals, strict=True)
    ]


def workload_stats(p: Params, name: str, requests: int | None = None) -> WorkloadStats:
    """Lengths and arrival rate of the slice a run replays (warmup requests included)."""
    count = (requests or p.requests) + p.warmup
    rows = _rows(name, TraceWindow(WORKLOADS[name][2], None, count, p.max_output_tokens))
    if len(rows) < p.warmup + 2:
        raise ValueError(f"workload {name} has fewer than warmup + 2 requests in its slice")
    span = max(a for a, _i, _o in rows) - min(a for a, _i, _o in rows)
    n = len(rows)
    mean_in, mean_out = sum(i for _a, i, _o in rows) / n, sum(o for _a, _i, o in rows) / n
    return WorkloadStats(n, span, mean_in, mean_out, n / max(span, 1e-9))


def capacity_rps(p: Params, stats: WorkloadStats, workers: int, speedup: float) -> float:
    """Requests/s the fleet can sustain by the timing model, uncached prompts: the smaller of
    the prefill bound (full-budget chunks, each step also paying a decode phase) and the
    sequence bound (Little's law: at most min(max_num_seqs, KV tokens / request tokens)
    requests decode at once, each for its output length in such full steps)."""
    step_ms = DEFAULT_PERF_MODEL.prefill_ms(p.max_num_batched_tokens) + DEFAULT_PERF_MODEL.decode_ms(0.3)
    prefill_bound = p.max_num_batched_tokens / (step_ms / 1000) / max(1.0, stats.mean_input_tokens)
    seqs = min(p.max_num_seqs, p.num_gpu_blocks * p.block_size / (stats.mean_input_tokens + stats.mean_output_tokens))
    seq_bound = seqs / (stats.mean_output_tokens * step_ms / 1000)
    return min(prefill_bound, seq_bound) * workers * speedup


# ---------------------------------------------------------------------------- one run


class StepClockStats(msgspec.Struct):
    wall_seconds: float
    modelled_seconds: float
    lag_fraction: float  # (wall - modelled) / wall over all busy steps of all workers
    max_lag_seconds: float  # the largest busy-period lag any worker reported
    # Our frontend's event loop: the largest timer delay seen, and the delay per request
    # summed over the run (a CPU-bound frontend delays every first token).
    frontend_loop_lag_max_seconds: float | None = None
    frontend_loop_lag_sum_seconds: float | None = None
    preemptions: float | None = None  # requests our workers preempted (KV exhausted) in the run


class RunResult(msgspec.Struct):
    policy: str
    server_commands: list[str]
    completed: int
    failed: int
    ttft_p50_ms: float | None
    ttft_p90_ms: float | None
    itl_p50_ms: float | None
    itl_p90_ms: float | None
    prefix_cache_hit_rate: float | None
    max_dispatch_lag_s: float
    step_clock: StepClockStats | None  # ours only


def _ms(dist: Distribution | None, field: str) -> float | None:
    return None if dist is None else getattr(dist, field) * 1e3


async def _metrics(url: str) -> str:
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url + "/metrics") as resp:
        return await resp.text()


async def watch_lag(url: str, worst: list[float], loop: list[float]) -> None:
    """Poll our workers' lag gauge (largest lag per metrics interval) and the frontend's
    event-loop lag (largest since the previous scrape) until cancelled."""
    while True:
        with contextlib.suppress(TimeoutError, aiohttp.ClientError, ValueError):
            text = await _metrics(url)
            worst += rq.gauge_values(text, "lightspeed_worker_step_lag_max_seconds")
            loop += rq.gauge_values(text, "lightspeed_frontend_event_loop_lag_seconds")
        await asyncio.sleep(1.0)


async def step_clock(url: str, worst: list[float], loop: list[float]) -> StepClockStats | None:
    text = await _metrics(url)
    wall = rq.gauge_sum(text, "lightspeed_worker_step_wall_seconds")
    modelled = rq.gauge_sum(text, "lightspeed_worker_step_modelled_seconds")
    if wall is None or modelled is None:
        return None
    lag_sum = rq.gauge_sum(text, "lightspeed_frontend_event_loop_lag_total_seconds")
    fraction = (wall - modelled) / wall if wall > 0 else 0.0
    preempted = rq.gauge_sum(text, "lightspeed_worker_preemptions")
    return StepClockStats(
        wall, modelled, fraction, max(worst, default=0.0), max(loop, default=None), lag_sum, preempted
    )


def bench_config(url: str, p: Params, cell: Cell, rate: float, stats: WorkloadStats, out_dir: Path) -> BenchConfig:
    path, fmt, start = WORKLOADS[cell.workload]
    return BenchConfig(
        url=url,
        trace=str(path),
        trace_format=fmt,
        speedup=rate / stats.trace_rps,  # arrival times compressed (> 1) or stretched to the rate
        trace_start_s=start,
        num_requests=stats.requests - p.warmup,
        warmup=p.warmup,
        max_output_tokens=p.max_output_tokens,
        concurrency=0,
        seed=p.seed,
        timeout_s=p.timeout,
        keepalive=False,  # as routing_quality: Dynamo delays first chunks on reused connections
        session_ids=False,  # Dynamo 1.6.1 ignores x-session-id; ours would pin sessions, even in rr
        progress=False,
        label=cell.label,
        out_dir=str(out_dir),
    )


def fleet_params(p: Params, cell: Cell) -> rq.Params:
    return rq.Params(
        workers=cell.workers,
        speedup_ratio=cell.speedup,
        block_size=p.block_size,
        num_gpu_blocks=p.num_gpu_blocks,
        max_num_seqs=p.max_num_seqs,
        max_num_batched_tokens=p.max_num_batched_tokens,
        max_model_len=p.max_model_len,
        seed=p.seed,
        frontend_processes=p.frontend_processes,
    )


async def run_one(
    policy: str, cell: Cell, cfg: BenchConfig, args: argparse.Namespace, p: Params, tmp: Path
) -> RunResult:
    system = rq.POLICIES[policy][0]
    log_dir = Path(args.work_dir) / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    service: Service = rq.build_service(policy, fleet_params(p, cell), log_dir, tmp, args)
    worst: list[float] = []
    loop: list[float] = []
    clock = None
    try:
        service.start()
        await rq.wait_ready(service, system, cell.workers)
        watcher = asyncio.create_task(watch_lag(service.url, worst, loop)) if system == "lightspeed" else None
        report = await run_bench(dataclasses.replace(cfg, url=service.url, label=f"{cell.label} {policy}"))
        if watcher is not None:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
            await asyncio.sleep(1.5)  # one more metrics interval: the last steps' totals
            clock = await step_clock(service.url, worst, loop)
    finally:
        service.stop()
    s = report.summary
    return RunResult(
        policy,
        [shlex.join(c) for c in service.commands],
        s.completed,
        s.failed,
        _ms(s.ttft_s, "p50"),
        _ms(s.ttft_s, "p90"),
        _ms(s.itl_s, "p50"),
        _ms(s.itl_s, "p90"),
        s.prefix_cache_hit_rate,
        report.max_dispatch_lag_s,
        clock,
    )


# ---------------------------------------------------------------------------- one cell


class Ratios(msgspec.Struct):
    ttft_p50: float | None
    ttft_p90: float | None
    itl_p50: float | None
    itl_p90: float | None


class CellResult(msgspec.Struct):
    workload: str
    workers: int
    speedup: float
    load: float
    offered_rps: float
    capacity_rps: float
    runs: list[RunResult]
    rr: Ratios | None  # ls-rr / dyn-rr
    kv: Ratios | None  # ls-kv / dyn-kv
    calibrated: bool | None  # rr within tolerance at TTFT p50 and p90
    kv_latency: Ratios | None = None  # ls-kv-latency / dyn-kv


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def ratios(ours: RunResult | None, theirs: RunResult | None) -> Ratios | None:
    if ours is None or theirs is None:
        return None
    return Ratios(
        _ratio(ours.ttft_p50_ms, theirs.ttft_p50_ms),
        _ratio(ours.ttft_p90_ms, theirs.ttft_p90_ms),
        _ratio(ours.itl_p50_ms, theirs.itl_p50_ms),
        _ratio(ours.itl_p90_ms, theirs.itl_p90_ms),
    )


def within(r: Ratios | None, tolerance: float) -> bool | None:
    if r is None or r.ttft_p50 is None or r.ttft_p90 is None:
        return None
    return abs(r.ttft_p50 - 1) <= tolerance and abs(r.ttft_p90 - 1) <= tolerance


async def run_cell(cell: Cell, p: Params, args: argparse.Namespace, stats: WorkloadStats) -> CellResult:
    capacity = capacity_rps(p, stats, cell.workers, cell.speedup)
    rate = cell.load * capacity
    wanted = math.ceil(rate * p.min_seconds)
    if wanted > p.requests:  # a longer slice of the same trace, from the same start
        stats = workload_stats(p, cell.workload, wanted)
    cfg = bench_config("http://placeholder", p, cell, rate, stats, Path(args.work_dir) / "runs")
    policies = [q for q in POLICIES if q.endswith("rr") or cell.workload in _split(p.kv_workloads)]
    policies = [q for q in policies if q in _split(args.policies)]
    logger.info("cell %s: %.2f req/s offered (capacity %.2f)", cell.label, rate, capacity)
    runs: dict[str, RunResult] = {}
    with tempfile.TemporaryDirectory(prefix="ls-calib-") as tmp:
        for policy in policies:
            runs[policy] = await run_one(policy, cell, cfg, args, p, Path(tmp))
            r = runs[policy]
            logger.info(
                "  %-7s TTFT p50 %7.0f p90 %7.0f ms, ITL p50 %5.1f ms, %d failed",
                policy,
                r.ttft_p50_ms or 0,
                r.ttft_p90_ms or 0,
                r.itl_p50_ms or 0,
                r.failed,
            )
    rr = ratios(runs.get("ls-rr"), runs.get("dyn-rr"))
    kv = ratios(runs.get("ls-kv"), runs.get("dyn-kv"))
    kv_latency = ratios(runs.get("ls-kv-latency"), runs.get("dyn-kv"))
    return CellResult(
        cell.workload,
        cell.workers,
        cell.speedup,
        cell.load,
        rate,
        capacity,
        list(runs.values()),
        rr,
        kv,
        within(rr, p.tolerance),
        kv_latency,
    )


# ---------------------------------------------------------------------------- the matrix


class MatrixReport(msgspec.Struct):
    params: dict[str, object]
    workloads: dict[str, WorkloadStats]
    cells: list[CellResult]
    calibrated_cells: int
    compared_cells: int
    seconds: float
    note: str


NOTE = (
    "Both fleets run the same timing model (Dynamo's polynomials) with the same engine flags; "
    "ours is `lightspeed serve --engine mocker --workers N` (N worker processes + a frontend), "
    "Dynamo's is one `dynamo.mocker --num-workers N` process (Rust) + `dynamo.frontend`, all on "
    "this machine's cores. Offered load is a fraction of the modelled capacity without prefix "
    "caching (capacity_rps). step_clock: our workers' busy wall vs modelled step seconds; a "
    "positive lag_fraction means our fleet ran slower than its model (CPU-bound)."
)


def multiturn_trace(p: Params) -> None:
    """(Re)write the multi-turn trace the `multiturn` workload replays (deterministic)."""
    spec = MultiTurnSpec(
        sessions=max(40, p.requests // 3),
        turns=(2, 10),
        system_tokens=2048,
        opening_tokens=(512, 16384),  # a document, a code base, a long instruction
        user_tokens=(64, 2048),
        seed=p.seed,
    )
    write_trace(spec, WORKLOADS["multiturn"][0])


async def run(args: argparse.Namespace, p: Params) -> MatrixReport:
    started = time.monotonic()
    names = sorted({c.workload for c in cells(p)})
    if "multiturn" in names:
        multiturn_trace(p)
    stats = {name: workload_stats(p, name) for name in names}
    results = []
    for cell in cells(p):
        results.append(await run_cell(cell, p, args, stats[cell.workload]))
    compared = [c for c in results if c.calibrated is not None]
    return MatrixReport(
        dataclasses.asdict(p),
        stats,
        results,
        sum(1 for c in compared if c.calibrated),
        len(compared),
        time.monotonic() - started,
        NOTE,
    )


def plot(report: MatrixReport, path: Path) -> None:
    """Heat map: one row per cell, one column per ratio (ours / Dynamo), 1.0 = white."""
    plt = pyplot()
    if plt is None or not report.cells:
        return
    columns = ["rr TTFT p50", "rr TTFT p90", "rr ITL p50", "kv TTFT p50", "kv TTFT p90", "kv-latency TTFT p90"]
    rows = [f"{c.workload} w{c.workers} s{c.speedup:g} load {c.load:g}" for c in report.cells]
    nan = float("nan")

    def values(c: CellResult) -> list[float]:
        rr = c.rr or Ratios(None, None, None, None)
        kv = c.kv or Ratios(None, None, None, None)
        kv_latency = c.kv_latency or Ratios(None, None, None, None)
        picked = [rr.ttft_p50, rr.ttft_p90, rr.itl_p50, kv.ttft_p50, kv.ttft_p90, kv_latency.ttft_p90]
        return [nan if v is None else v for v in picked]

    grid = [values(c) for c in report.cells]
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(rows) + 1.8))
    image = ax.imshow(grid, cmap="RdBu_r", vmin=0.7, vmax=1.3, aspect="auto")
    ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if v == v:  # not NaN
                color = "white" if abs(v - 1) > 0.2 else "black"  # readable on the saturated ends
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color=color)
    fig.colorbar(image, ax=ax, label="Lightspeed / Dynamo (1 = equal)")
    ax.set_title(f"Mocker calibration: {report.calibrated_cells}/{report.compared_cells} cells within 10% (rr)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def replot(json_path: Path) -> None:
    """Redraw the heat map of a result file (e.g. after a change to `plot`)."""
    report = msgspec.json.decode(json_path.read_bytes(), type=MatrixReport)
    plot(report, json_path.with_suffix(".png"))


def summarize(report: MatrixReport) -> None:
    for c in report.cells:
        rr, kv = c.rr, c.kv
        logger.info(
            "%-34s rr p50 %s p90 %s | kv p50 %s p90 %s | %s",
            f"{c.workload} w{c.workers} s{c.speedup:g} l{c.load:g}",
            _fmt(rr and rr.ttft_p50),
            _fmt(rr and rr.ttft_p90),
            _fmt(kv and kv.ttft_p50),
            _fmt(kv and kv.ttft_p90),
            {True: "ok", False: "OFF", None: "-"}[c.calibrated],
        )
    logger.info("calibrated: %d of %d cells", report.calibrated_cells, report.compared_cells)


def _fmt(v: float | None) -> str:
    return "  -  " if v is None else f"{v:5.2f}"


def add_flags(ap: argparse.ArgumentParser) -> None:
    rq.add_flags(ap)  # --policies, --dynamo-venv, --dynamo-model-dir, --model-name, --work-dir
    ap.set_defaults(policies=DEFAULT_POLICIES, work_dir=str(WORK / "calibration-matrix"))


SMOKE = Smoke(
    "calibration_matrix",
    {"workloads": "azure-code", "kv_workloads": "", "workers": "2", "speedups": "4", "loads": "0.3", "requests": 12},
)


def check(args: argparse.Namespace, p: Params) -> Params:
    p = SMOKE.check(args, p)
    unknown = set(_split(args.policies)) - set(POLICIES)
    if unknown:
        raise ValueError(f"unknown policies {sorted(unknown)}; known: {', '.join(POLICIES)}")
    return p


def _add_flags(ap: argparse.ArgumentParser) -> None:
    add_flags(ap)
    SMOKE.add_flags(ap)


SCRIPT = Script(
    name="calibration_matrix",
    doc=__doc__,
    params=Params,
    run=run,
    result_path=SMOKE.result_path,
    add_flags=_add_flags,
    check=check,
    plot=plot,
    summarize=summarize,
)


if __name__ == "__main__":
    raise SystemExit(main(SCRIPT))
