"""Benchmark report: the JSON record of a run, a text summary, and PNG plots.

Plots need matplotlib; without it the JSON is still written and the plots are skipped with a
log line, so a bare install can benchmark.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

from lightspeed.bench.client import RequestResult
from lightspeed.bench.config import BenchConfig
from lightspeed.bench.stats import BenchSummary, Distribution, TimeSeries

logger = logging.getLogger(__name__)

REPORT_FILE = "report.json"
REQUESTS_FILE = "requests.jsonl"
CDF_FILE = "latency_cdf.png"
TIMESERIES_FILE = "timeseries.png"


class BenchReport(msgspec.Struct):
    label: str
    url: str
    model: str
    mode: str
    started_at: str
    config: BenchConfig
    summary: BenchSummary
    timeseries: TimeSeries
    max_dispatch_lag_s: float  # open loop: worst lateness vs schedule (client saturation)


def _ms(d: Distribution | None) -> str:
    if d is None:
        return "n/a"
    ms = {name: getattr(d, name) * 1e3 for name in ("p50", "p90", "p99", "mean")}
    return "  ".join(f"{name} {value:.2f}" for name, value in ms.items())


def summary_lines(s: BenchSummary, clock: str = "") -> list[str]:
    """The headline figures of a summary, one line each (milliseconds for latencies); `clock`
    tags the duration (e.g. " (virtual)" for a replay)."""
    hit = "n/a" if s.prefix_cache_hit_rate is None else f"{s.prefix_cache_hit_rate:.3f}"
    return [
        f"  requests  {s.completed} ok / {s.failed} failed in {s.duration_s:.2f} s{clock}",
        f"  req/s     {s.req_per_s:.2f}",
        f"  tok/s     output {s.output_tok_per_s:.1f}  input {s.input_tok_per_s:.1f}",
        f"  TTFT ms   {_ms(s.ttft_s)}",
        f"  ITL ms    {_ms(s.itl_s)}",
        f"  TPOT ms   {_ms(s.tpot_s)}",
        f"  E2E ms    {_ms(s.e2e_s)}",
        f"  prefix cache hit rate {hit}",
    ]


def failure_lines(s: BenchSummary) -> list[str]:
    return ["  failures  " + ", ".join(f"{k}={v}" for k, v in s.failures.items())] if s.failures else []


def format_summary(report: BenchReport) -> str:
    """A short human-readable table of the headline figures (milliseconds for latencies)."""
    s = report.summary
    head = f"{report.label or 'bench'}: {report.url} model={report.model} mode={report.mode}"
    return "\n".join([head, *summary_lines(s), *failure_lines(s)]) + "\n"


def write_report(
    report: BenchReport,
    results: Sequence[RequestResult],
    out_dir: str | Path,
    save_requests: bool = False,
) -> Path:
    """Write report.json, the plots, and with `save_requests` a requests.jsonl dump."""
    out = write_report_json(report, results, out_dir, save_requests)
    write_plots(report, results, out)
    return out / REPORT_FILE


def write_report_json(report: Any, results: Sequence[RequestResult], out_dir: str | Path, save_requests: bool) -> Path:
    """report.json (any msgspec-encodable report) and, with `save_requests`, requests.jsonl
    under `out_dir` (created); returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT_FILE).write_bytes(msgspec.json.format(msgspec.json.encode(report), indent=2))
    if save_requests:
        encoder = msgspec.json.Encoder()
        with open(out / REQUESTS_FILE, "wb") as f:
            for r in results:
                f.write(encoder.encode(r) + b"\n")
    return out


def _pyplot() -> Any:  # matplotlib.pyplot is a module object; matplotlib ships no stubs
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; never try to open a display
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib not installed: skipping plots")
        return None
    return plt


def write_plots(report: BenchReport, results: Sequence[RequestResult], out: Path) -> None:
    plt = _pyplot()
    if plt is None:
        return
    if results:
        _plot_cdfs(plt, results, out / CDF_FILE, report.label)
    _plot_timeseries(plt, report.timeseries, out / TIMESERIES_FILE, report.label)


def _plot_cdfs(plt: Any, results: Sequence[RequestResult], path: Path, title: str) -> None:
    ok = [r for r in results if r.ok]
    samples = {
        "TTFT": [r.ttft_s * 1e3 for r in ok if r.ttft_s is not None],
        "ITL": [x * 1e3 for r in ok for x in r.itls_s],
        "E2E": [r.e2e_s * 1e3 for r in ok],
    }
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (name, values) in zip(axes, samples.items(), strict=True):
        values.sort()
        n = len(values)
        ax.plot(values, [(i + 1) / n for i in range(n)])
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of samples")
        ax.grid(alpha=0.3)
        ax.set_title(name)
    fig.suptitle(f"{title or 'bench'}: latency CDFs")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_timeseries(plt: Any, ts: TimeSeries, path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.plot(ts.t_s, ts.output_tok_per_s, label="output tok/s")
    ax.plot(ts.t_s, ts.completed_per_s, label="completed req/s")
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("per second")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(ts.t_s, [t * 1e3 for t in ts.mean_ttft_s], color="tab:red", alpha=0.6, label="TTFT ms")
    ax2.set_ylabel("mean TTFT of requests started (ms)")
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper left")
    fig.suptitle(f"{title or 'bench'}: throughput and TTFT over time")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
