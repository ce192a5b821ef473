"""The replay report: `lightspeed bench`'s summary of the same requests, plus SLA attainment,
worker-seconds, the planner's decisions and a timeline (request rate, replicas, TTFT), as JSON
and a PNG.

A request is within the SLA when it completed, its TTFT is at most the TTFT target, and its mean
inter-token latency ((e2e - ttft) / (tokens - 1), the bench's TPOT) is at most the ITL target.
"""

from __future__ import annotations

import bisect
import logging
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

from lightspeed.bench.client import RequestResult
from lightspeed.bench.report import REPORT_FILE, failure_lines, summary_lines, write_report_json
from lightspeed.bench.stats import BenchSummary, TimeSeries, percentile, summarize, time_series
from lightspeed.planner.core import Decision
from lightspeed.sim.config import ReplayConfig
from lightspeed.sim.fleet import ReplicaPoint
from lightspeed.sim.simulation import SimOutcome

logger = logging.getLogger(__name__)

TIMELINE_FILE = "timeline.png"
TIMELINE_BUCKETS = 200


class SlaSummary(msgspec.Struct):
    ttft_slo_s: float
    itl_slo_s: float
    requests: int
    within: int
    attainment: float  # within / requests (failed requests are misses)
    ttft_attainment: float
    itl_attainment: float


class Timeline(msgspec.Struct):
    """Per bucket of virtual time: arrivals per second, workers serving and paid for at the
    bucket's start, and TTFT of the requests that arrived in it (0.0 when none did)."""

    bucket_s: float
    t_s: list[float]
    request_rate: list[float]
    serving: list[int]
    provisioned: list[int]
    ttft_p50_s: list[float]
    ttft_p90_s: list[float]


class ReplayReport(msgspec.Struct):
    label: str
    command: str
    started_at: str
    config: ReplayConfig
    summary: BenchSummary
    timeseries: TimeSeries
    sla: SlaSummary
    worker_seconds: float
    peak_workers: int
    virtual_seconds: float
    wall_seconds: float
    events: int
    kv_events: int
    timeline: Timeline
    decisions: list[Decision]


def _mean_itl(r: RequestResult) -> float | None:
    if r.ttft_s is None or r.output_tokens < 2:
        return None
    return (r.e2e_s - r.ttft_s) / (r.output_tokens - 1)


def sla_summary(results: Sequence[RequestResult], ttft_slo_s: float, itl_slo_s: float) -> SlaSummary:
    n = len(results)
    ttft_ok = itl_ok = both = 0
    for r in results:
        if not r.ok or r.ttft_s is None:
            continue
        itl = _mean_itl(r)
        a = r.ttft_s <= ttft_slo_s
        b = itl is None or itl <= itl_slo_s
        ttft_ok += a
        itl_ok += b
        both += a and b
    frac = (lambda k: k / n) if n else (lambda k: 0.0)
    return SlaSummary(ttft_slo_s, itl_slo_s, n, both, frac(both), frac(ttft_ok), frac(itl_ok))


def timeline(
    results: Sequence[RequestResult], replicas: Sequence[ReplicaPoint], end_s: float, buckets: int = TIMELINE_BUCKETS
) -> Timeline:
    bucket = max(end_s, 1e-9) / buckets
    arrivals = [0] * buckets
    ttfts: list[list[float]] = [[] for _ in range(buckets)]
    for r in results:
        b = min(buckets - 1, int(r.start_s / bucket))
        arrivals[b] += 1
        if r.ttft_s is not None:
            ttfts[b].append(r.ttft_s)
    starts = [i * bucket for i in range(buckets)]
    times = [p.t_s for p in replicas]
    at = [replicas[max(0, bisect.bisect_right(times, t) - 1)] if replicas else None for t in starts]
    return Timeline(
        bucket_s=bucket,
        t_s=starts,
        request_rate=[a / bucket for a in arrivals],
        serving=[p.serving if p else 0 for p in at],
        provisioned=[p.provisioned if p else 0 for p in at],
        ttft_p50_s=[percentile(sorted(v), 50) if v else 0.0 for v in ttfts],
        ttft_p90_s=[percentile(sorted(v), 90) if v else 0.0 for v in ttfts],
    )


def build_report(cfg: ReplayConfig, outcome: SimOutcome, command: str = "") -> ReplayReport:
    results = [r.result() for r in outcome.requests]
    duration = max(outcome.end_s, 1e-9)
    return ReplayReport(
        label=cfg.label,
        command=command,
        started_at=datetime.now(UTC).isoformat(timespec="seconds"),
        config=cfg,
        summary=summarize(results, duration),
        timeseries=time_series(results, bucket_s=max(duration / 200, 0.1)),
        sla=sla_summary(results, cfg.planner.ttft_slo_s, cfg.planner.itl_slo_s),
        worker_seconds=outcome.worker_seconds,
        peak_workers=outcome.peak_workers,
        virtual_seconds=outcome.end_s,
        wall_seconds=outcome.wall_s,
        events=outcome.events,
        kv_events=outcome.kv_events,
        timeline=timeline(results, outcome.replicas, outcome.end_s),
        decisions=outcome.decisions,
    )


def format_replay(report: ReplayReport) -> str:
    """The bench's text summary (virtual time) plus SLA, cost and simulation speed."""
    s, sla = report.summary, report.sla
    lines = [
        f"{report.label or 'replay'}: {report.config.trace.path} ({report.config.fleet.router_mode} router)",
        *summary_lines(s, " (virtual)"),
        f"  SLA (TTFT <= {sla.ttft_slo_s:g} s, ITL <= {sla.itl_slo_s * 1e3:g} ms): {sla.attainment * 100:.2f}% "
        f"(TTFT {sla.ttft_attainment * 100:.2f}%, ITL {sla.itl_attainment * 100:.2f}%)",
        f"  workers   {report.worker_seconds:.0f} worker-seconds, peak {report.peak_workers}",
        f"  simulated {report.virtual_seconds:.1f} s in {report.wall_seconds:.1f} s wall ({report.events} events)",
        *failure_lines(s),
    ]
    return "\n".join(lines) + "\n"


def write_replay(
    report: ReplayReport, results: Sequence[RequestResult], out_dir: str | Path, save_requests: bool = False
) -> Path:
    """report.json and timeline.png (and requests.jsonl with `save_requests`) under `out_dir`."""
    out = write_report_json(report, results, out_dir, save_requests)
    plot_timeline(report, out / TIMELINE_FILE)
    return out / REPORT_FILE


def _pyplot() -> Any:  # matplotlib ships no stubs
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib not installed: skipping the timeline plot")
        return None
    return plt


def _ms_or_gap(values: Sequence[float]) -> list[float]:
    """Milliseconds; a bucket with no arrivals (0.0 in the JSON) is a gap in the line."""
    return [v * 1e3 if v > 0 else math.nan for v in values]


def plot_timeline(report: ReplayReport, path: Path) -> None:
    """Three stacked panels over virtual time: request rate, replicas, TTFT p50/p90."""
    plt = _pyplot()
    if plt is None:
        return
    tl = report.timeline
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(10, 7.5), sharex=True)
    ax1.plot(tl.t_s, tl.request_rate, color="tab:blue")
    ax1.set_ylabel("arrivals (req/s)")
    ax2.step(tl.t_s, tl.serving, where="post", label="serving")
    ax2.step(tl.t_s, tl.provisioned, where="post", label="paid (incl. starting/draining)", alpha=0.7)
    ax2.set_ylabel("workers")
    ax2.legend(loc="upper left")
    ax3.plot(tl.t_s, _ms_or_gap(tl.ttft_p50_s), label="TTFT p50")
    ax3.plot(tl.t_s, _ms_or_gap(tl.ttft_p90_s), label="TTFT p90", alpha=0.7)
    if math.isfinite(report.sla.ttft_slo_s):
        ax3.axhline(report.sla.ttft_slo_s * 1e3, color="tab:red", linestyle="--", label="TTFT SLO")
    ax3.set_ylabel("TTFT (ms)")
    ax3.set_yscale("log")
    ax3.set_xlabel("virtual time (s)")
    ax3.legend(loc="upper left")
    for ax in (ax1, ax2, ax3):
        ax.grid(alpha=0.3)
    sla = report.sla
    fig.suptitle(f"{report.label or 'replay'}: SLA {sla.attainment * 100:.1f}%, {report.worker_seconds:.0f} worker-s")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
