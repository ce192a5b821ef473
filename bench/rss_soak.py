"""Memory soak: RSS of the native worker and the frontend over a long closed-loop run.

Starts `lightspeed serve --engine native` (1 worker), runs the `lightspeed.bench` client at
concurrency 16 for `--duration-s` (default 10 minutes), and meanwhile samples the resident set
size of the worker and frontend processes (children of the serve supervisor, found through
/proc) every `--interval-s`. Writes bench/results/rss_soak.json (samples, start / end / max RSS,
least-squares slope over the last `--slope-window-s`) and rss_soak.png (the curves).
A leak shows as a positive slope that does not flatten; a flat curve means steady state.

Run from the repo root:
    flock /tmp/lightspeed-bench.lock .venv/bin/python bench/rss_soak.py
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shlex
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import msgspec
from harness import (
    RESULTS,
    WORK,
    Script,
    Service,
    find_roles,
    main,
    native_service,
    pyplot,
    rss_mb,
    wait_model_ready,
    with_service,
)

from lightspeed.bench import BenchConfig, run_bench

logger = logging.getLogger("rss_soak")

ROLES = ("worker", "frontend")


@dataclass(frozen=True, slots=True)
class Params:
    duration_s: float = 600.0
    interval_s: float = 5.0
    slope_window_s: float = 480.0  # slope over the last 8 minutes
    concurrency: int = 16
    isl: int = 256
    osl: int = 64
    warmup: int = 16
    dtype: str = "bfloat16"
    max_num_batched_tokens: int = 2048
    seed: int = 0

    def __post_init__(self) -> None:
        if self.duration_s <= 0 or self.interval_s <= 0 or self.slope_window_s <= 0:
            raise ValueError("duration_s, interval_s and slope_window_s must be > 0")
        if self.concurrency < 1 or self.isl < 1 or self.osl < 1:
            raise ValueError("concurrency, isl and osl must be >= 1")


class RssSample(msgspec.Struct):
    t_s: float  # since the measured load started (negative: warmup)
    rss_mb: dict[str, float]  # role -> MB


class RoleStats(msgspec.Struct):
    pid: int
    start_mb: float  # first sample of the measured phase
    end_mb: float
    max_mb: float
    slope_mb_per_min: float  # least squares over the last slope_window_s


class Report(msgspec.Struct):
    params: Params
    server_command: str
    load: dict[str, float]  # requests, req/s, output tok/s, failures of the soak
    stats: dict[str, RoleStats]
    samples: list[RssSample]
    note: str


async def sample_rss(roles: dict[str, int], interval_s: float, out: list[tuple[float, dict[str, float]]]) -> None:
    """Append (monotonic time, role -> RSS MB) every interval until cancelled."""
    while True:
        now = time.monotonic()
        out.append((now, {r: rss_mb(pid) for r, pid in roles.items()}))
        await asyncio.sleep(max(0.0, interval_s - (time.monotonic() - now)))


def slope_mb_per_min(samples: list[RssSample], role: str, window_s: float) -> float:
    import numpy as np

    end = samples[-1].t_s
    pts = [(s.t_s, s.rss_mb[role]) for s in samples if s.t_s >= end - window_s]
    if len(pts) < 2:
        return 0.0
    t, y = np.array(pts).T
    return float(np.polyfit(t / 60.0, y, 1)[0])


def role_stats(samples: list[RssSample], roles: dict[str, int], window_s: float) -> dict[str, RoleStats]:
    measured = [s for s in samples if s.t_s >= 0] or samples
    return {
        role: RoleStats(
            pid,
            measured[0].rss_mb[role],
            measured[-1].rss_mb[role],
            max(s.rss_mb[role] for s in measured),
            slope_mb_per_min(measured, role, window_s),
        )
        for role, pid in roles.items()
    }


async def soak(svc: Service, p: Params) -> tuple[dict[str, int], list[RssSample], dict[str, float]]:
    roles = await _wait_roles(svc.procs[0].pid)
    raw: list[tuple[float, dict[str, float]]] = []
    sampler = asyncio.create_task(sample_rss(roles, p.interval_s, raw))
    warm = BenchConfig(
        url=svc.url,
        concurrency=p.concurrency,
        num_requests=p.warmup,
        isl=p.isl,
        osl=p.osl,
        progress=False,
        seed=p.seed + 1,
    )
    await run_bench(warm)
    t0 = time.monotonic()
    cfg = BenchConfig(
        url=svc.url,
        concurrency=p.concurrency,
        num_requests=None,
        duration_s=p.duration_s,
        isl=p.isl,
        osl=p.osl,
        progress=False,
        seed=p.seed,
        label="rss-soak",
    )
    summary = (await run_bench(cfg)).summary
    await asyncio.sleep(p.interval_s)  # one sample after the load stops
    sampler.cancel()
    load = {
        "requests": float(summary.requests),
        "completed": float(summary.completed),
        "failed": float(summary.failed),
        "req_per_s": summary.req_per_s,
        "output_tok_per_s": summary.output_tok_per_s,
    }
    return roles, [RssSample(t - t0, rss) for t, rss in raw], load


async def _wait_roles(serve_pid: int) -> dict[str, int]:
    for _ in range(100):
        roles = find_roles(serve_pid)
        if len(roles) == len(ROLES):
            return roles
        await asyncio.sleep(0.1)
    raise RuntimeError(f"serve pid {serve_pid}: no {ROLES} children found")


def plot(report: Report, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, len(ROLES), figsize=(12, 4.2))
    for ax, role in zip(axes, ROLES):
        ts = [s.t_s / 60 for s in report.samples]
        ys = [s.rss_mb[role] for s in report.samples]
        st = report.stats[role]
        ax.plot(ts, ys, marker=".", lw=1)
        ax.axvline(0, color="gray", ls=":", lw=1)
        ax.set_title(
            f"{role} (pid {st.pid}): {st.start_mb:.0f} -> {st.end_mb:.0f} MB, "
            f"max {st.max_mb:.0f}, slope {st.slope_mb_per_min:+.2f} MB/min",
            fontsize=9,
        )
        ax.set_xlabel("minutes since the measured load started (warmup before 0)")
        ax.set_ylabel("RSS (MB)")
        lo, hi = min(ys), max(ys)
        ax.set_ylim(lo - max(5.0, 0.05 * lo), hi + max(5.0, 0.05 * hi))
        ax.grid(alpha=0.3)
    p = report.params
    fig.suptitle(
        f"RSS soak: lightspeed serve --engine native, concurrency {p.concurrency}, "
        f"ISL {p.isl} / OSL {p.osl}, {p.duration_s / 60:.0f} min, "
        f"{report.load['completed']:.0f} requests",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


NOTE = (
    "RSS = VmRSS from /proc/<pid>/status of the serve supervisor's worker and frontend "
    "children. The worker's RSS includes the weights and the KV cache tensor (allocated "
    "zeroed at start, so its pages become resident as blocks are first written); slope is a "
    "least-squares fit over the last slope_window_s of the measured phase."
)


async def run(args: argparse.Namespace, p: Params) -> Report:
    with tempfile.TemporaryDirectory(prefix="ls-soak-") as tmp:
        svc = native_service(
            "lightspeed-soak", p.dtype, WORK / "rss-soak-logs", Path(tmp), max_batched=p.max_num_batched_tokens
        )
        roles, samples, load = await with_service(svc, wait_model_ready, lambda _: soak(svc, p))
    return Report(
        p,
        shlex.join(svc.commands[0]),
        load,
        role_stats(samples, roles, p.slope_window_s),
        samples,
        NOTE,
    )


def add_flags(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--name", default="rss_soak", help="output file stem")


def result_path(args: argparse.Namespace) -> Path:
    return RESULTS / f"{args.name}.json"


def summarize(report: Report) -> None:
    for role, st in report.stats.items():
        logger.info(
            "%s: %.1f -> %.1f MB (max %.1f), slope over last %.0f s: %+.3f MB/min",
            role,
            st.start_mb,
            st.end_mb,
            st.max_mb,
            report.params.slope_window_s,
            st.slope_mb_per_min,
        )
    logger.info("load: %s", report.load)


SCRIPT = Script(
    name="rss_soak",
    doc=__doc__,
    params=Params,
    run=run,
    result_path=result_path,
    add_flags=add_flags,
    plot=plot,
    summarize=summarize,
)


if __name__ == "__main__":
    raise SystemExit(main(SCRIPT))
