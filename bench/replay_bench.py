"""`lightspeed replay` benchmarks (issue 17): speed, fidelity against a live fleet, the planner.

--part speed     one hour of the Azure conversation trace over 8 mocker workers (kv router):
                 wall seconds of the replay (target <= 300 s on this machine).
--part fidelity  a 10-minute slice run live (`lightspeed serve --engine mocker` + the bench
                 client) and replayed with the same fleet: TTFT p50/p90 and SLA attainment
                 (target: within 10%).
--part planner   the whole Azure conversation trace, compressed `--planner-speedup` times,
                 through replay: static fleets of each size in `--static-sizes`, the planner in
                 throughput mode with each predictor, and in load mode. SLA TTFT <= 2 s and
                 ITL <= 50 ms in modelled time; % of requests within SLA and worker-seconds of
                 each (target: >= 95% within SLA on <= 60% of the worker-seconds of the static
                 fleet sized for the peak, i.e. the smallest static fleet that meets the SLA).

Run from the repo root, under the bench lock:
  flock /tmp/lightspeed-bench.lock .venv/bin/python bench/replay_bench.py --part speed
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import msgspec
from harness import RESULTS, ROOT, WORK, Script, free_port, lightspeed_serve, main, pyplot, wait_for_model

from lightspeed.bench import BenchConfig, run_bench
from lightspeed.bench.client import RequestResult
from lightspeed.bench.stats import BenchSummary
from lightspeed.bench.traces import MooncakeTrace
from lightspeed.engine.config import EngineConfig
from lightspeed.sim.cli import load_slice, run_replay
from lightspeed.sim.config import FleetConfig, PlannerSettings, ReplayConfig, TraceSlice
from lightspeed.sim.report import ReplayReport, SlaSummary, sla_summary

logger = logging.getLogger("replay_bench")

PARTS = ("speed", "fidelity", "planner")
AZURE_CONV = ROOT.parent / "shared" / "traces" / "azure_llm_inference_conv_2023.csv"
SPEED_TARGET_S = 300.0
FIDELITY_TOLERANCE = 0.10
SLA_TARGET = 0.95
WORKER_SECONDS_TARGET = 0.60


@dataclass(frozen=True)
class Params:
    part: str = "speed"
    trace: str = str(AZURE_CONV)
    router_mode: str = "kv"
    ttft_slo: float = 2.0
    itl_slo: float = 0.05
    # speed
    workers: int = 8
    # fidelity
    fidelity_window_s: float = 600.0
    fidelity_start_s: float = 0.0
    fidelity_workers: int = 2
    fidelity_speedup_ratio: float = 0.5
    tight_ttft_slo: float = 0.1
    tight_itl_slo: float = 0.016
    # planner
    planner_speedup: float = 10.0
    planner_interval_s: float = 10.0
    planner_start_delay_s: float = 5.0
    planner_max_workers: int = 8
    static_sizes: str = "2,3,4,5,6"
    predictors: str = "constant,moving-average,kalman,arima"
    planner_utilization: float = 1.0  # throughput mode's target utilization (headroom for bursts)

    def __post_init__(self) -> None:
        if self.part not in PARTS:
            raise ValueError(f"part must be one of {', '.join(PARTS)}; got {self.part!r}")


def _cfg(
    p: Params,
    *,
    workers: int,
    speedup: float = 1.0,
    window_s: float | None = None,
    start_s: float = 0.0,
    speedup_ratio: float = 1.0,
    planner: PlannerSettings | None = None,
    label: str = "",
) -> ReplayConfig:
    trace = TraceSlice(p.trace, speedup=speedup, start_s=start_s, window_s=window_s)
    fleet = FleetConfig(workers, EngineConfig(), speedup_ratio, p.router_mode)
    sla = planner or PlannerSettings(ttft_slo_s=p.ttft_slo, itl_slo_s=p.itl_slo)
    return ReplayConfig(trace, fleet, sla, label=label)


def _brief(report: ReplayReport) -> dict[str, Any]:
    s = report.summary
    ttft, itl = s.ttft_s, s.itl_s
    return {
        "completed": s.completed,
        "failed": s.failed,
        "ttft_p50_s": ttft.p50 if ttft else None,
        "ttft_p90_s": ttft.p90 if ttft else None,
        "ttft_p99_s": ttft.p99 if ttft else None,
        "itl_p50_s": itl.p50 if itl else None,
        "tpot_p90_s": s.tpot_s.p90 if s.tpot_s else None,
        "sla_attainment": report.sla.attainment,
        "worker_seconds": report.worker_seconds,
        "peak_workers": report.peak_workers,
        "virtual_seconds": report.virtual_seconds,
        "wall_seconds": report.wall_seconds,
    }


# ---------------------------------------------------------------------------- speed


def run_speed(p: Params) -> dict[str, Any]:
    cfg = _cfg(p, workers=p.workers, label=f"speed: full trace, {p.workers} workers")
    started = time.perf_counter()
    report, _ = run_replay(cfg)
    wall = time.perf_counter() - started
    logger.info("replayed %.0f s of trace in %.1f s wall", report.virtual_seconds, wall)
    return {
        "part": "speed",
        "params": asdict(p),
        "target_wall_s": SPEED_TARGET_S,
        "wall_s_total": wall,  # trace loading + simulation + report
        "wall_s_simulation": report.wall_seconds,
        "met": wall <= SPEED_TARGET_S,
        "requests": report.summary.requests,
        "events": report.events,
        "kv_events": report.kv_events,
        "result": _brief(report),
        "summary": report.summary,
    }


# ---------------------------------------------------------------------------- fidelity


async def _live(p: Params, out: Path) -> tuple[BenchSummary, list[RequestResult]]:
    port = free_port()
    flags: dict[str, object] = {
        "--host": "127.0.0.1",
        "--port": port,
        "--workers": p.fidelity_workers,
        "--router-mode": p.router_mode,
        "--speedup-ratio": p.fidelity_speedup_ratio,
        "--log-level": "WARNING",
    }
    service = lightspeed_serve("live", "mocker", port, flags, out / "logs")
    try:
        service.start()
        await wait_for_model(service, 120.0)
        await _wait_workers(service.url, p.fidelity_workers)
        cfg = BenchConfig(
            url=service.url,
            trace=p.trace,
            trace_start_s=p.fidelity_start_s,
            trace_window_s=p.fidelity_window_s,
            num_requests=None,  # the whole slice (the dataclass default is 1000)
            progress=False,
            save_requests=True,
            out_dir=str(out),
        )
        report = await run_bench(cfg)
    finally:
        service.stop()
    decoder = msgspec.json.Decoder(RequestResult)
    results = [decoder.decode(line) for line in (out / "requests.jsonl").read_bytes().splitlines() if line]
    return report.summary, results


async def _wait_workers(url: str, n: int, timeout_s: float = 60.0) -> None:
    import aiohttp

    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            async with session.get(url + "/health") as resp:
                if len((await resp.json(content_type=None)).get("workers", [])) >= n:
                    return
            await asyncio.sleep(0.3)
    raise RuntimeError(f"{n} workers did not register in {timeout_s} s")


def _rel(modelled: float | None, real: float | None) -> float | None:
    if modelled is None or real is None or real == 0:
        return None
    return (modelled - real) / real


def _slas(p: Params, results: list[RequestResult]) -> dict[str, SlaSummary]:
    return {
        "default": sla_summary(results, p.ttft_slo, p.itl_slo),
        "tight": sla_summary(results, p.tight_ttft_slo, p.tight_itl_slo),
    }


async def run_fidelity(p: Params) -> dict[str, Any]:
    out = WORK / "replay_fidelity"
    live_summary, live_results = await _live(p, out)
    cfg = _cfg(
        p,
        workers=p.fidelity_workers,
        window_s=p.fidelity_window_s,
        start_s=p.fidelity_start_s,
        speedup_ratio=p.fidelity_speedup_ratio,
        label="fidelity",
    )
    report, outcome = run_replay(cfg)
    sim_results = [r.result() for r in outcome.requests]
    live_sla, sim_sla = _slas(p, live_results), _slas(p, sim_results)
    lt, st = live_summary.ttft_s, report.summary.ttft_s
    errors = {
        "ttft_p50": _rel(st.p50 if st else None, lt.p50 if lt else None),
        "ttft_p90": _rel(st.p90 if st else None, lt.p90 if lt else None),
        **{f"sla_{k}": _rel(sim_sla[k].attainment, live_sla[k].attainment) for k in live_sla},
    }
    met = all(e is not None and abs(e) <= FIDELITY_TOLERANCE for e in errors.values())
    return {
        "part": "fidelity",
        "params": asdict(p),
        "tolerance": FIDELITY_TOLERANCE,
        "relative_error": errors,
        "met": met,
        "live": {"summary": live_summary, "sla": live_sla},
        "replay": {"summary": report.summary, "sla": sim_sla, "wall_seconds": report.wall_seconds},
        "ttft_samples_s": {
            "live": sorted(r.ttft_s for r in live_results if r.ttft_s is not None),
            "replay": sorted(r.ttft_s for r in sim_results if r.ttft_s is not None),
        },
    }


# ---------------------------------------------------------------------------- planner


def _minute_rates(p: Params) -> tuple[float, float]:
    """Mean and peak arrival rate over 1-minute windows of trace time (uncompressed)."""
    trace = load_slice(TraceSlice(p.trace))
    arrivals = list(trace.arrivals) if isinstance(trace, MooncakeTrace) else [r.arrival_s for r in trace.rows]
    per_min = collections.Counter(int(a // 60) for a in arrivals)
    rates = [per_min[i] / 60 for i in range(max(per_min) + 1)]
    return sum(rates) / len(rates), max(rates)


def _planner_run(p: Params, mode: str, predictor: str, workers: int) -> ReplayReport:
    settings = PlannerSettings(
        mode=mode,
        predictor=predictor,
        ttft_slo_s=p.ttft_slo,
        itl_slo_s=p.itl_slo,
        max_workers=p.planner_max_workers,
        adjustment_interval_s=p.planner_interval_s,
        start_delay_s=p.planner_start_delay_s,
        target_utilization=p.planner_utilization,
    )
    label = f"planner {mode}" + (f" {predictor}" if mode == "throughput" else "")
    cfg = _cfg(p, workers=workers, speedup=p.planner_speedup, planner=settings, label=label)
    report, _ = run_replay(cfg)
    logger.info("%s: SLA %.2f%%, %.0f worker-s", label, report.sla.attainment * 100, report.worker_seconds)
    return report


def run_planner(p: Params) -> dict[str, Any]:
    runs: dict[str, ReplayReport] = {}
    for n in (int(x) for x in p.static_sizes.split(",")):
        report, _ = run_replay(_cfg(p, workers=n, speedup=p.planner_speedup, label=f"static {n}"))
        logger.info("static %d: SLA %.2f%%, %.0f worker-s", n, report.sla.attainment * 100, report.worker_seconds)
        runs[f"static-{n}"] = report
    statics = sorted((int(k.split("-")[1]), k) for k in runs)
    peak_key = next((k for n, k in statics if runs[k].sla.attainment >= SLA_TARGET), statics[-1][1])
    n_peak = int(peak_key.split("-")[1])
    mean_rate, peak_rate = _minute_rates(p)
    n_mean = max(1, math.ceil(n_peak * mean_rate / peak_rate))
    start = n_mean
    for predictor in p.predictors.split(","):
        runs[f"throughput-{predictor}"] = _planner_run(p, "throughput", predictor, start)
    runs["load"] = _planner_run(p, "load", "constant", start)
    base = runs[peak_key].worker_seconds
    rows = {k: {**_brief(r), "worker_seconds_vs_peak": r.worker_seconds / base} for k, r in runs.items()}
    for k in rows:
        r = runs[k]
        rows[k]["met"] = r.sla.attainment >= SLA_TARGET and r.worker_seconds <= WORKER_SECONDS_TARGET * base
    return {
        "part": "planner",
        "params": asdict(p),
        "offered": {"mean_rate_per_min_window": mean_rate, "peak_rate_per_min_window": peak_rate},
        "static_peak": peak_key,
        "static_mean": f"static-{n_mean}",
        "targets": {"sla": SLA_TARGET, "worker_seconds_vs_peak": WORKER_SECONDS_TARGET},
        "runs": rows,
        "timelines": {
            k: {"t_s": r.timeline.t_s, "serving": r.timeline.serving, "rate": r.timeline.request_rate}
            for k, r in runs.items()
            if not k.startswith("static")
        },
        "decisions": {k: r.decisions for k, r in runs.items() if not k.startswith("static")},
    }


# ---------------------------------------------------------------------------- script


def run(args: argparse.Namespace, p: Params) -> Any:
    if p.part == "speed":
        return run_speed(p)
    if p.part == "fidelity":
        return run_fidelity(p)
    return run_planner(p)


def result_path(args: argparse.Namespace) -> Path:
    return RESULTS / f"replay_{args.part}.json"


def plot(payload: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    if plt is None or payload["part"] == "speed":
        return
    if payload["part"] == "fidelity":
        _plot_fidelity(plt, payload, path)
    else:
        _plot_planner(plt, payload, path)


def _plot_fidelity(plt: Any, payload: dict[str, Any], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, samples in payload["ttft_samples_s"].items():
        n = len(samples)
        ax.plot([s * 1e3 for s in samples], [(i + 1) / n for i in range(n)], label=f"{name} ({n})")
    e = payload["relative_error"]
    ax.set_title(f"TTFT CDF, live vs replay (p50 {e['ttft_p50']:+.1%}, p90 {e['ttft_p90']:+.1%})")
    ax.set_xlabel("TTFT (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_planner(plt: Any, payload: dict[str, Any], path: Path) -> None:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5))
    for name, row in payload["runs"].items():
        marker = "s" if name.startswith("static") else "o"
        ax1.scatter(row["worker_seconds_vs_peak"], row["sla_attainment"] * 100, marker=marker)
        ax1.annotate(name, (row["worker_seconds_vs_peak"], row["sla_attainment"] * 100), fontsize=8)
    ax1.axhline(SLA_TARGET * 100, color="tab:red", linestyle="--")
    ax1.axvline(WORKER_SECONDS_TARGET, color="tab:red", linestyle="--")
    ax1.set_xlabel(f"worker-seconds / {payload['static_peak']}")
    ax1.set_ylabel("% requests within SLA")
    ax1.grid(alpha=0.3)
    for name, tl in payload["timelines"].items():
        ax2.step(tl["t_s"], tl["serving"], where="post", label=name)
    any_tl = next(iter(payload["timelines"].values()))
    ax3 = ax2.twinx()
    ax3.plot(any_tl["t_s"], any_tl["rate"], color="gray", alpha=0.4)
    ax3.set_ylabel("arrivals (req/s)")
    ax2.set_xlabel("virtual time (s)")
    ax2.set_ylabel("workers serving")
    ax2.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summarize(payload: dict[str, Any]) -> None:
    if payload["part"] == "speed":
        logger.info("speed: %.1f s wall (target %.0f s)", payload["wall_s_total"], SPEED_TARGET_S)
    elif payload["part"] == "fidelity":
        logger.info("fidelity: %s (met: %s)", payload["relative_error"], payload["met"])
    else:
        for name, row in payload["runs"].items():
            logger.info(
                "%-26s SLA %6.2f%%  worker-s %7.0f (%.2f of %s)",
                name,
                row["sla_attainment"] * 100,
                row["worker_seconds"],
                row["worker_seconds_vs_peak"],
                payload["static_peak"],
            )


SCRIPT = Script(
    name="replay_bench",
    doc=__doc__,
    params=Params,
    run=run,
    result_path=result_path,
    plot=plot,
    summarize=summarize,
)

if __name__ == "__main__":
    raise SystemExit(main(SCRIPT))
