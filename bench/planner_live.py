"""SLA planner, live: the Azure conversation trace on a `lightspeed serve --engine mocker` fleet,
planner-driven (throughput mode, one run per predictor) vs static fleets sized for the peak and
for the mean. Per run: % of requests within the SLA and worker-seconds.

Compression: the trace (1 h) is replayed `--compress` times faster and the mocker runs at the
same `--speedup-ratio`, so every modelled duration is kept: a wall-clock latency times the
compression is the modelled latency the SLA (TTFT <= 2 s, ITL <= 50 ms, both modelled) is
checked against, and the planner gets its interval and targets divided by the compression.
`--thin K` keeps every K-th request (the load's shape, 1/K of its rate) so the client, frontend
and workers fit the CPUs of this machine; requests whose prompt + output exceed the context
(`--max-context`) are dropped. Workers are small (`--max-num-seqs`) so the fleet needs several.

A request is within the SLA when it succeeded, its TTFT x compression <= ttft_slo and its mean
inter-token gap x compression <= itl_slo. Worker-seconds integrate the number of live worker
processes (sampled every 0.25 s; a draining worker still counts) over the run, in modelled
seconds. The static sizes come from the planner's own arithmetic (DESIGN §7) on the thinned
trace: `peak` = the largest count over adjustment intervals, `mean` = the count at the mean
rate / ISL / OSL. `oracle_ws_ratio` is what a planner that knew every interval's load in advance
would use, against the peak fleet: no planner of this arithmetic can go below it.

Run from the repo root (final numbers under the bench lock):
  flock /tmp/lightspeed-bench.lock .venv/bin/python bench/planner_live.py
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import logging
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import msgspec
from harness import (
    RESULTS,
    ROOT,
    WORK,
    Script,
    Service,
    child_pids,
    free_port,
    lightspeed_serve,
    main,
    pyplot,
    wait_for_model,
)

from lightspeed.bench.client import RequestResult
from lightspeed.bench.traces import load_azure
from lightspeed.planner.arithmetic import Budget, EngineLimits, Observation, SlaTarget, plan_replicas
from lightspeed.protocol import PerfModel

logger = logging.getLogger("planner_live")
TRACE = ROOT.parent / "shared" / "traces" / "azure_llm_inference_conv_2023.csv"
SAMPLE_S = 0.25


@dataclass(frozen=True)
class Params:
    trace: str = str(TRACE)
    thin: int = 3  # keep every K-th request
    compress: float = 12.0  # trace time / wall time = the mocker's speedup ratio
    window_s: float = 0.0  # trace seconds to replay (0 = all)
    max_context: int = 8192
    num_gpu_blocks: int = 1024
    block_size: int = 64
    max_num_seqs: int = 2
    ttft_slo: float = 2.0  # modelled seconds
    itl_slo: float = 0.05
    interval_s: float = 60.0  # planner adjustment interval, modelled seconds
    max_workers: int = 8
    predictors: str = "constant,kalman,arima"
    statics: str = "peak,mean"
    router_mode: str = "kv"

    def __post_init__(self) -> None:
        if self.thin < 1 or self.compress <= 0 or self.interval_s <= 0:
            raise ValueError("thin >= 1, compress > 0 and interval_s > 0")
        if self.max_context > self.num_gpu_blocks * self.block_size:
            raise ValueError("max_context must fit one worker's KV cache")

    def runs(self) -> list[str]:
        """The first predictor, the static fleets, then the other predictors (so a run cut short
        still compares one planner with the static fleets)."""
        names = [f"planner-{p.strip()}" for p in self.predictors.split(",") if p.strip()]
        statics = [f"static-{s.strip()}" for s in self.statics.split(",") if s.strip()]
        return names[:1] + statics + names[1:]


class RunResult(msgspec.Struct):
    name: str
    workers_at_start: int
    requests: int
    failed: int
    within_sla_pct: float
    ttft_ok_pct: float
    itl_ok_pct: float
    ttft_p50_s: float
    ttft_p90_s: float
    itl_p50_s: float
    itl_p90_s: float
    duration_s: float  # modelled
    worker_seconds: float  # modelled
    peak_workers: int
    mean_workers: float
    timeline: list[tuple[float, int]]  # (modelled seconds, live workers), thinned to 1 per interval/4
    decisions: list[tuple[float, int]] = []  # planner runs: (modelled seconds, decided replicas)


class Payload(msgspec.Struct):
    params: dict[str, object]
    trace_requests: int
    dropped_over_context: int
    sizing: dict[str, object]
    runs: list[RunResult]
    ratios: dict[str, dict[str, float]]


# ---------------------------------------------------------------- trace and sizing


def thinned_trace(p: Params, out: Path) -> tuple[Path, int, int]:
    """Every `thin`-th row within `max_context` (and the window) to a CSV; (path, kept, dropped)."""
    with open(p.trace, newline="") as f:
        rows = list(csv.DictReader(f))
    kept, dropped = [], 0
    for row in rows[:: p.thin]:
        if int(row["ContextTokens"]) + int(row["GeneratedTokens"]) > p.max_context:
            dropped += 1
            continue
        kept.append(row)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        writer.writerows(kept)
    return out, len(kept), dropped


def sizing(p: Params, trace: Path) -> dict[str, object]:
    """Static fleet sizes from the planner's arithmetic, per adjustment interval of the trace."""
    rows = load_azure(trace).rows
    limits = EngineLimits(p.num_gpu_blocks * p.block_size, p.max_num_seqs)
    sla, budget, model = SlaTarget(p.ttft_slo, p.itl_slo), Budget(10_000), PerfModel.dynamo_default()
    end = p.window_s or max(r.arrival_s for r in rows)
    per_interval = []
    for k in range(math.ceil(end / p.interval_s)):
        sel = [r for r in rows if k * p.interval_s <= r.arrival_s < (k + 1) * p.interval_s]
        if not sel:
            per_interval.append(1)
            continue
        obs = Observation(
            len(sel) / p.interval_s,
            statistics.fmean(r.context_tokens for r in sel),
            statistics.fmean(r.generated_tokens for r in sel),
        )
        per_interval.append(plan_replicas(obs, sla, budget, model, limits).aggregated)
    sel = [r for r in rows if r.arrival_s < end]
    mean_obs = Observation(
        len(sel) / end,
        statistics.fmean(r.context_tokens for r in sel),
        statistics.fmean(r.generated_tokens for r in sel),
    )
    peak = max(per_interval)
    return {
        "peak": peak,
        "mean": plan_replicas(mean_obs, sla, budget, model, limits).aggregated,
        "per_interval": per_interval,
        "oracle_ws_ratio": sum(per_interval) / (peak * len(per_interval)),
        "mean_rate_rps": mean_obs.request_rate,
        "mean_isl": mean_obs.isl,
        "mean_osl": mean_obs.osl,
        "window_s": end,
    }


# ---------------------------------------------------------------- one run


def serve_for(p: Params, name: str, workers: int, log_dir: Path, decision_log: Path) -> Service:
    port = free_port()
    serve_flags: dict[str, object] = {
        "--port": port,
        "--workers": workers,
        "--speedup-ratio": p.compress,
        "--num-gpu-blocks": p.num_gpu_blocks,
        "--block-size": p.block_size,
        "--max-num-seqs": p.max_num_seqs,
        "--max-model-len": p.max_context,
        "--router-mode": p.router_mode,
    }
    if name.startswith("planner-"):
        serve_flags |= {
            "--planner": "true",
            "--mode": "throughput",
            "--predictor": name.removeprefix("planner-"),
            "--adjustment-interval": p.interval_s / p.compress,
            "--ttft-slo": p.ttft_slo / p.compress,
            "--itl-slo": p.itl_slo / p.compress,
            "--min-workers": 1,
            "--max-workers": p.max_workers,
            "--decision-log": decision_log,
        }
    return lightspeed_serve(name, "mocker", port, serve_flags, log_dir)


def live_workers(serve_pid: int) -> int:
    count = 0
    for pid in child_pids(serve_pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        count += b"worker" in argv[:5]
    return count


async def sample_workers(serve_pid: int, samples: list[tuple[float, int]], stop: asyncio.Event) -> None:
    while not stop.is_set():
        samples.append((time.monotonic(), live_workers(serve_pid)))
        await asyncio.sleep(SAMPLE_S)


async def run_bench_client(p: Params, url: str, trace: Path, out: Path) -> None:
    cmd = [sys.executable, "-m", "lightspeed", "bench", "--url", url, "--trace", str(trace)]
    cmd += ["--speedup", str(p.compress), "--concurrency", "0", "--timeout", "600", "--no-progress"]
    cmd += ["--save-requests", "--out", str(out), "--label", out.name]
    if p.window_s:
        cmd += ["--trace-window", str(p.window_s)]
    proc = await asyncio.create_subprocess_exec(*cmd, cwd=ROOT)
    if await proc.wait() != 0:
        raise RuntimeError(f"bench client failed ({proc.returncode}): {' '.join(cmd)}")


async def one_run(p: Params, name: str, workers: int, trace: Path) -> RunResult:
    work = WORK / "planner_live" / name
    decision_log = work / "decisions.jsonl"
    decision_log.unlink(missing_ok=True)
    service = serve_for(p, name, workers, work / "logs", decision_log)
    samples: list[tuple[float, int]] = []
    stop = asyncio.Event()
    try:
        service.start()
        await wait_for_model(service, 120.0)
        await asyncio.sleep(3.0)  # every worker registered, the planner primed
        sampler = asyncio.create_task(sample_workers(service.procs[0].pid, samples, stop))
        t0 = time.monotonic()
        await run_bench_client(p, service.url, trace, work / "bench")
        t1 = time.monotonic()
        stop.set()
        await sampler
    finally:
        service.stop()
    results = [
        msgspec.json.decode(line, type=RequestResult)
        for line in (work / "bench" / "requests.jsonl").read_bytes().splitlines()
    ]
    return summarize_run(p, name, workers, results, samples, (t0, t1), decisions(decision_log, t0, p))


def decisions(path: Path, t0: float, p: Params) -> list[tuple[float, int]]:
    if not path.exists():
        return []
    wall0 = time.time() - (time.monotonic() - t0)  # unix time of t0
    out = []
    for line in path.read_bytes().splitlines():
        rec = msgspec.json.decode(line)
        out.append(((rec["time"] - wall0) * p.compress, int(rec["decision"]["replicas"])))
    return out


def summarize_run(
    p: Params,
    name: str,
    workers: int,
    results: list[RequestResult],
    samples: list[tuple[float, int]],
    window: tuple[float, float],
    decided: list[tuple[float, int]],
) -> RunResult:
    c = p.compress
    ttft_ok = [r.ok and r.ttft_s is not None and r.ttft_s * c <= p.ttft_slo for r in results]
    itl_ok = [r.ok and (not r.itls_s or statistics.fmean(r.itls_s) * c <= p.itl_slo) for r in results]
    ttfts = sorted(r.ttft_s * c for r in results if r.ttft_s is not None)
    itls = sorted(g * c for r in results for g in r.itls_s)
    t0, t1 = window
    inside = [(t, n) for t, n in samples if t0 <= t <= t1]
    ws = sum(n * SAMPLE_S for _, n in inside) * c
    n = len(results)
    every = max(1, int(p.interval_s / c / SAMPLE_S / 4))
    return RunResult(
        name=name,
        workers_at_start=workers,
        requests=n,
        failed=sum(not r.ok for r in results),
        within_sla_pct=100.0 * sum(a and b for a, b in zip(ttft_ok, itl_ok, strict=True)) / n,
        ttft_ok_pct=100.0 * sum(ttft_ok) / n,
        itl_ok_pct=100.0 * sum(itl_ok) / n,
        ttft_p50_s=_pct(ttfts, 0.5),
        ttft_p90_s=_pct(ttfts, 0.9),
        itl_p50_s=_pct(itls, 0.5),
        itl_p90_s=_pct(itls, 0.9),
        duration_s=(t1 - t0) * c,
        worker_seconds=ws,
        peak_workers=max((k for _, k in inside), default=0),
        mean_workers=statistics.fmean(k for _, k in inside) if inside else 0.0,
        timeline=[((t - t0) * c, k) for t, k in inside[::every]],
        decisions=decided,
    )


def _pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] if values else math.nan


# ---------------------------------------------------------------- script


async def run(args: argparse.Namespace, p: Params) -> Payload:
    trace, kept, dropped = thinned_trace(p, WORK / "planner_live" / f"conv_thin{p.thin}.csv")
    size = sizing(p, trace)
    logger.info("fleet sizes by the arithmetic: peak %s, mean %s (oracle ws ratio %.2f)",
                size["peak"], size["mean"], size["oracle_ws_ratio"])  # fmt: skip
    runs = []
    for name in p.runs():
        kind = name.removeprefix("static-")
        workers = int(size[kind]) if name.startswith("static-") else int(size["mean"])  # type: ignore[call-overload]
        logger.info("run %s (%d workers at start)", name, workers)
        runs.append(await one_run(p, name, workers, trace))
        logger.info("  %s", _line(runs[-1]))
        partial = payload(p, kept, dropped, size, runs)  # kept after each run, in case the rest is cut
        (WORK / "planner_live" / "partial.json").write_bytes(msgspec.json.encode(partial))
    return payload(p, kept, dropped, size, runs)


def payload(p: Params, kept: int, dropped: int, size: dict[str, object], runs: list[RunResult]) -> Payload:
    peak = next((r for r in runs if r.name == "static-peak"), None)
    ratios = {r.name: {"ws_vs_peak": r.worker_seconds / peak.worker_seconds if peak else math.nan} for r in runs}
    return Payload(asdict(p), kept, dropped, size, runs, ratios)


def _line(r: RunResult) -> str:
    return (
        f"{r.name}: {r.within_sla_pct:.1f}% within SLA (TTFT {r.ttft_ok_pct:.1f}%, ITL {r.itl_ok_pct:.1f}%), "
        f"{r.worker_seconds:.0f} worker-s, mean {r.mean_workers:.2f} workers, peak {r.peak_workers}, "
        f"{r.failed} failed of {r.requests}"
    )


def summarize(payload: Payload) -> None:
    for r in payload.runs:
        logger.info("%s (%.2f of peak's worker-seconds)", _line(r), payload.ratios[r.name]["ws_vs_peak"])


def plot(payload: Payload, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, (ax_w, ax_b) = plt.subplots(2, 1, figsize=(11, 8), gridspec_kw={"height_ratios": [2, 1]})
    interval = float(payload.params["interval_s"])  # type: ignore[arg-type]
    need = payload.sizing["per_interval"]
    assert isinstance(need, list)
    ax_w.step([i * interval / 60 for i in range(len(need))], need, where="post", color="grey", ls=":",
              label="arithmetic on the trace (oracle)")  # fmt: skip
    for r in payload.runs:
        ax_w.plot([t / 60 for t, _ in r.timeline], [k for _, k in r.timeline], label=r.name, lw=1.2)
    ax_w.set_xlabel("modelled minutes")
    ax_w.set_ylabel("live workers")
    ax_w.legend(fontsize=8)
    ax_w.set_title("Azure conversation trace, mocker fleet: workers over time")
    names = [r.name for r in payload.runs]
    x = range(len(names))
    ax_b.bar([i - 0.2 for i in x], [r.within_sla_pct for r in payload.runs], 0.4, label="% within SLA")
    ax_b.bar([i + 0.2 for i in x], [100 * payload.ratios[n]["ws_vs_peak"] for n in names], 0.4,
             label="% of peak fleet's worker-seconds")  # fmt: skip
    ax_b.axhline(95, color="green", ls="--", lw=0.8)
    ax_b.axhline(60, color="red", ls="--", lw=0.8)
    ax_b.set_xticks(list(x), names, fontsize=8)
    ax_b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


SCRIPT = Script(
    name="planner_live",
    doc=__doc__,
    params=Params,
    run=run,
    result_path=lambda args: RESULTS / "planner_live.json",
    plot=plot,
    summarize=summarize,
)

if __name__ == "__main__":
    raise SystemExit(main(SCRIPT))
