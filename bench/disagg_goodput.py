"""Goodput of disaggregated vs aggregated serving on a mocker fleet (DESIGN §6, issue 16).

Four mocker workers (Dynamo's timing model) serve a slice of the Azure LLM conversation trace
(../shared/traces) replayed open loop by `lightspeed bench` at a sweep of request rates, as:
  agg        4 aggregated workers (`--workers 4`)
  xPyD       x prefill + y decode workers, every prefill remote (`--disagg xPyD --no-conditional-disagg`)
  cond-xPyD  the same pools with conditional disaggregation (the default policy) on the best split
all with the KV router. A request meets the SLA when its TTFT <= --ttft-slo and its inter-token
latency <= --itl-slo, both in *modelled* time. ITL is judged two ways, both reported: "p90" (the
headline; a request meets it when 90% of its own token gaps are within the SLO, so a request
whose stream stalls behind other requests' prefills misses it) and "mean" (TPOT, (e2e - TTFT) /
(tokens - 1), which a few long stalls barely move). Times are modelled:
the mocker runs at `--mocker-speedup` (< 1 = slower than the model, which keeps the 2-core host
far from saturation), so modelled seconds = wall seconds x mocker speedup, and the request rates
are modelled rates too. Goodput = requests meeting both SLAs per modelled second of offered
load. "Aggregated misses the SLA" at the first rate where fewer than --attainment of its requests
meet it; the headline compares goodputs there (the best split is chosen by the p90 goodput).

Run from the repo root:
  flock /tmp/lightspeed-bench.lock .venv/bin/python bench/disagg_goodput.py
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import shlex
import tempfile
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import msgspec
from harness import RESULTS, Script, Service, free_port, lightspeed_serve, main, pyplot, wait_for_workers

from lightspeed.bench import BenchConfig, run_bench
from lightspeed.bench.client import RequestResult
from lightspeed.bench.traces import TraceWindow, load_azure
from lightspeed.config import parse_disagg

logger = logging.getLogger("disagg_goodput")
TRACE = Path("/work/shared/traces/azure_llm_inference_conv_2023.csv")
READY_TIMEOUT_S = 120.0
_DECISION = re.compile(r'^lightspeed_frontend_disagg_decisions_total\{reason="([a-z_]+)"\} (\S+)$', re.M)


@dataclass(frozen=True, slots=True)
class Params:
    workers: int = 4
    splits: str = "1P3D,2P2D,3P1D"  # disaggregated pool splits to try (x + y = workers)
    rates: str = "40,70,100,130,160"  # modelled requests per second
    duration: float = 4.0  # modelled seconds of arrivals per rate (rate x duration requests)
    trace_start: float = 0.0  # trace seconds
    mocker_speedup: float = 0.3  # mocker --speedup-ratio (modelled s = wall s x this)
    block_size: int = 64
    num_gpu_blocks: int = 16384
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    kv_transfer_bandwidth: float = 25e9  # bytes/s, modelled
    prefill_busy_frac: float = 2.0  # conditional: prefill pool busy past this x batch tokens queued
    ttft_slo: float = 2.0  # modelled seconds
    itl_slo: float = 0.05  # modelled seconds (mean inter-token latency per request)
    attainment: float = 0.9  # a configuration meets the SLA at a rate when this share of requests do
    seed: int = 0

    def __post_init__(self) -> None:
        for x, y in (parse_disagg(s) for s in self.split_list):
            if x + y != self.workers:
                raise ValueError(f"split {x}P{y}D does not use {self.workers} workers")
        if not self.rate_list or min(self.rate_list) <= 0:
            raise ValueError("rates must be positive")
        if self.mocker_speedup <= 0 or not 0 < self.attainment <= 1:
            raise ValueError("mocker_speedup must be > 0 and attainment in (0, 1]")

    @property
    def split_list(self) -> list[str]:
        return [s.strip() for s in self.splits.split(",") if s.strip()]

    @property
    def rate_list(self) -> list[float]:
        return [float(r) for r in self.rates.split(",") if r.strip()]


class Point(msgspec.Struct):
    rate: float  # offered, modelled req/s
    completed: int
    failed: int
    met_ttft: int
    met_itl: int
    met_both: int  # TTFT and mean ITL within the SLOs
    met_p90: int  # TTFT and the p90 of the request's own inter-token gaps within the SLOs
    attainment: dict[str, float]  # "p90" / "mean" -> share of requests meeting both SLOs
    goodput: dict[str, float]  # "p90" / "mean" -> modelled req/s meeting both SLOs
    ttft_p50_s: float | None  # modelled
    ttft_p90_s: float | None
    tpot_p50_s: float | None
    tpot_p90_s: float | None
    decisions: dict[str, float]  # frontend's disagg decisions during this rate
    max_dispatch_lag_s: float


class ConfigResult(msgspec.Struct):
    name: str
    command: str
    points: list[Point]


class Headline(msgspec.Struct):
    agg_first_miss_rate: float | None  # first rate where aggregated attainment < --attainment
    goodput_at_miss: dict[str, float]  # configuration -> goodput at that rate
    ratio_best_vs_agg: float | None  # max(best split, conditional) / aggregated there
    target_met: bool | None  # ratio >= 1.3


class Result(msgspec.Struct):
    params: dict[str, object]
    trace: str
    configs: list[ConfigResult]
    best_split: str
    headline: dict[str, Headline]  # per ITL judgement ("p90", "mean")


def serve_flags(p: Params, name: str, port: int, discovery: Path) -> tuple[dict[str, object], list[str]]:
    flags: dict[str, object] = {
        "--speedup-ratio": p.mocker_speedup,
        "--block-size": p.block_size,
        "--num-gpu-blocks": p.num_gpu_blocks,
        "--max-num-seqs": p.max_num_seqs,
        "--max-num-batched-tokens": p.max_num_batched_tokens,
        "--kv-transfer-bandwidth": p.kv_transfer_bandwidth,
        "--prefill-busy-frac": p.prefill_busy_frac,
        "--router-mode": "kv",
        "--seed": p.seed,
        "--host": "127.0.0.1",
        "--port": port,
        "--discovery-path": discovery,
    }
    if name == "agg":
        return {**flags, "--workers": p.workers}, []
    split = name.removeprefix("cond-")
    extra = [] if name.startswith("cond-") else ["--no-conditional-disagg"]
    return {**flags, "--disagg": split}, extra


async def decisions(url: str) -> dict[str, float]:
    async with aiohttp.ClientSession() as session, session.get(url + "/metrics") as resp:
        text = await resp.text()
    return {reason: float(value) for reason, value in _DECISION.findall(text)}


def score(p: Params, rate: float, rows: list[RequestResult], lag: float, delta: dict[str, float]) -> Point:
    """SLA attainment and goodput of one rate's per-request results, in modelled time."""
    s = p.mocker_speedup
    ok = [r for r in rows if r.ok and r.ttft_s is not None]
    ttfts = [(r.ttft_s or 0.0) * s for r in ok]
    tpots = [tpot(r) * s for r in ok]
    met_ttft = sum(t <= p.ttft_slo for t in ttfts)
    met_itl = sum(t <= p.itl_slo for t in tpots)
    met = sum(a <= p.ttft_slo and b <= p.itl_slo for a, b in zip(ttfts, tpots, strict=True))
    gaps = [quantile([g * s for g in r.itls_s], 0.9) or 0.0 for r in ok]
    strict = sum(a <= p.ttft_slo and g <= p.itl_slo for a, g in zip(ttfts, gaps, strict=True))
    n = len(rows)
    return Point(
        rate,
        len(ok),
        n - len(ok),
        met_ttft,
        met_itl,
        met,
        strict,
        {"p90": strict / n if n else 0.0, "mean": met / n if n else 0.0},
        {"p90": rate * strict / n if n else 0.0, "mean": rate * met / n if n else 0.0},
        quantile(ttfts, 0.5),
        quantile(ttfts, 0.9),
        quantile(tpots, 0.5),
        quantile(tpots, 0.9),
        delta,
        lag,
    )


def tpot(r: RequestResult) -> float:
    """Mean inter-token latency of one request (0 with fewer than two tokens)."""
    if r.output_tokens < 2 or r.ttft_s is None:
        return 0.0
    return (r.e2e_s - r.ttft_s) / (r.output_tokens - 1)


def quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def trace_slice(p: Params, rate: float) -> tuple[int, float]:
    """Requests at `rate` for `duration` modelled seconds, and the slice's recorded rate."""
    n = max(2, round(rate * p.duration))
    rows = load_azure(TRACE, window=TraceWindow(p.trace_start, None, n)).rows
    return n, (n - 1) / (rows[-1].arrival_s - rows[0].arrival_s)


async def run_rate(p: Params, service: Service, index: int, rate: float, out_dir: Path) -> Point:
    n, base_rate = trace_slice(p, rate)
    trace_speedup = rate * p.mocker_speedup / base_rate  # wall rate / recorded rate
    before = await decisions(service.url)
    cfg = BenchConfig(
        url=service.url,
        trace=str(TRACE),
        trace_format="azure",
        speedup=trace_speedup,
        trace_start_s=p.trace_start,
        num_requests=n,
        concurrency=0,
        seed=p.seed + index,  # other prompts at each rate: no cache carried from the last one
        timeout_s=900.0,
        progress=False,
        label=f"{service.name}@{rate:g}",
        out_dir=str(out_dir),
        save_requests=True,
    )
    report = await run_bench(cfg)
    after = await decisions(service.url)
    delta = {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0) > 0}
    decoder = msgspec.json.Decoder(RequestResult)
    rows = [decoder.decode(line) for line in (out_dir / "requests.jsonl").read_bytes().splitlines() if line.strip()]
    point = score(p, rate, rows, report.max_dispatch_lag_s, delta)
    logger.info(
        "%s @ %g req/s: %d/%d meet both (TTFT %d, mean ITL %d; p90 ITL %d), TTFT p90 %.2f s, TPOT p90 %.1f ms %s",
        service.name,
        rate,
        point.met_both,
        len(rows),
        point.met_ttft,
        point.met_itl,
        point.met_p90,
        point.ttft_p90_s or 0,
        (point.tpot_p90_s or 0) * 1e3,
        delta,
    )
    return point


async def run_config(p: Params, name: str, work: Path) -> ConfigResult:
    port = free_port()
    discovery = Path(tempfile.mkdtemp(prefix=f"disagg-{name}-", dir=work))
    flags, extra = serve_flags(p, name, port, discovery)
    service = lightspeed_serve(name, "mocker", port, flags, work / "logs", extra)
    points: list[Point] = []
    service.start()
    try:
        await wait_for_workers(service, p.workers, READY_TIMEOUT_S)
        for index, rate in enumerate(p.rate_list):
            points.append(await run_rate(p, service, index, rate, work / name / f"{rate:g}"))
            await asyncio.sleep(2.0)  # let the fleet drain between rates
    finally:
        service.stop()
    return ConfigResult(name, shlex.join(service.commands[0]), points)


def first_miss(cfg: ConfigResult, attainment: float, judge: str) -> float | None:
    return next((pt.rate for pt in cfg.points if pt.attainment[judge] < attainment), None)


def goodput_at(cfg: ConfigResult, rate: float, judge: str) -> float:
    return next(pt.goodput[judge] for pt in cfg.points if pt.rate == rate)


def best_split(configs: list[ConfigResult], rate: float | None) -> str:
    """The split with the highest p90 goodput where aggregated first misses (else summed)."""

    def key(c: ConfigResult) -> float:
        return goodput_at(c, rate, "p90") if rate is not None else sum(pt.goodput["p90"] for pt in c.points)

    return max(configs, key=key).name


def headline(p: Params, configs: list[ConfigResult], best: str, judge: str) -> Headline:
    by_name = {c.name: c for c in configs}
    miss = first_miss(by_name["agg"], p.attainment, judge)
    if miss is None:
        return Headline(None, {}, None, None)
    at_miss = {c.name: goodput_at(c, miss, judge) for c in configs}
    if at_miss["agg"] <= 0:
        return Headline(miss, at_miss, None, None)
    ratio = max(at_miss[best], at_miss[f"cond-{best}"]) / at_miss["agg"]
    return Headline(miss, at_miss, ratio, ratio >= 1.3)


async def run(args: argparse.Namespace, p: Params) -> Result:
    work = Path(tempfile.mkdtemp(prefix="disagg-goodput-"))
    logger.info("work dir %s", work)
    agg = await run_config(p, "agg", work)
    splits = [await run_config(p, s, work) for s in p.split_list]
    best = best_split(splits, first_miss(agg, p.attainment, "p90"))
    cond = await run_config(p, f"cond-{best}", work)
    configs = [agg, *splits, cond]
    return Result(
        params={k: getattr(p, k) for k in Params.__dataclass_fields__},
        trace=str(TRACE),
        configs=configs,
        best_split=best,
        headline={judge: headline(p, configs, best, judge) for judge in ("p90", "mean")},
    )


def plot(result: Result, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    for row, judge in enumerate(("p90", "mean")):
        ax_good, ax_att = axes[row]
        for cfg in result.configs:
            rates = [pt.rate for pt in cfg.points]
            ax_good.plot(rates, [pt.goodput[judge] for pt in cfg.points], marker="o", label=cfg.name)
            ax_att.plot(rates, [pt.attainment[judge] * 100 for pt in cfg.points], marker="o", label=cfg.name)
        ax_good.plot(rates, rates, color="grey", linestyle=":", label="offered")
        ax_good.set_ylabel(f"goodput, req/s (ITL {judge})")
        ax_att.set_ylabel(f"% meeting TTFT and ITL ({judge})")
        ax_att.axhline(float(result.params["attainment"]) * 100, color="grey", linestyle=":")  # type: ignore[arg-type]
        miss = result.headline[judge].agg_first_miss_rate
        for ax in (ax_good, ax_att):
            ax.set_xlabel("offered load, req/s (modelled)")
            if miss is not None:
                ax.axvline(miss, color="tab:red", alpha=0.3)
        ax_good.legend(fontsize=8)
    fig.suptitle("Azure conversation trace, 4 mocker workers: goodput at TTFT <= 2 s and ITL <= 50 ms")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def summarize(result: Result) -> None:
    for judge, h in result.headline.items():
        logger.info(
            "ITL %s: best split %s; aggregated first misses at %s req/s; goodput there %s; ratio %.2f (1.3: %s)",
            judge,
            result.best_split,
            h.agg_first_miss_rate,
            {k: round(v, 1) for k, v in h.goodput_at_miss.items()},
            h.ratio_best_vs_agg or 0.0,
            h.target_met,
        )


SCRIPT = Script(
    name="disagg_goodput",
    doc=__doc__,
    params=Params,
    run=run,
    result_path=lambda args: RESULTS / "disagg_goodput.json",
    plot=plot,
    summarize=summarize,
)

if __name__ == "__main__":
    raise SystemExit(main(SCRIPT))
