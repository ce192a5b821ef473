"""`lightspeed replay` flags and entry point; every flag also reads LIGHTSPEED_<FLAG>.

The trace flags are `lightspeed bench`'s, the fleet flags `serve --engine mocker`'s, the planner
flags `lightspeed planner`'s; the report is the bench's plus SLA attainment and worker-seconds.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys

from lightspeed.bench.cli import Flag, add_flags, env_name
from lightspeed.bench.config import TRACE_FORMATS
from lightspeed.bench.traces import AzureTrace, MooncakeTrace, TraceWindow, load_trace
from lightspeed.bench.workload import TokenSpace
from lightspeed.config import QUEUE_POLICIES, RouterConfig
from lightspeed.engine.config import EngineConfig
from lightspeed.planner.predictors import PREDICTORS
from lightspeed.sim.config import (
    PLANNER_MODES,
    REPLAY_ROUTER_MODES,
    FleetConfig,
    PlannerSettings,
    ReplayConfig,
    TraceSlice,
)
from lightspeed.sim.report import ReplayReport, build_report, format_replay, write_replay
from lightspeed.sim.simulation import SimOutcome, Simulation

logger = logging.getLogger(__name__)

FLAGS = (
    # the trace, as `lightspeed bench` replays it
    Flag("--trace", str, None, "Mooncake JSONL or Azure CSV trace to replay (required)"),
    Flag("--trace-format", str, "auto", "trace format", TRACE_FORMATS),
    Flag("--speedup", float, 1.0, "divide trace inter-arrival times by this"),
    Flag("--trace-start", float, 0.0, "replay from this trace time (s)"),
    Flag("--trace-window", float, None, "replay only this many seconds of trace time"),
    Flag("--num-requests", int, None, "replay at most this many requests"),
    Flag("--max-output-tokens", int, None, "cap each request's max_tokens"),
    Flag("--duration", float, None, "stop sending after this many (virtual) seconds"),
    Flag("--seed", int, 0, "seed for prompts, routing ties and output tokens"),
    Flag("--vocab-size", int, 49152, "prompt token ids are drawn below this"),
    Flag("--min-token-id", int, 100, "and at or above this"),
    # the fleet, as `serve --engine mocker` runs it
    Flag("--workers", int, 1, "workers at the start"),
    Flag("--block-size", int, 64, "tokens per KV block"),
    Flag("--num-gpu-blocks", int, 16384, "KV cache size in blocks per worker"),
    Flag("--max-num-seqs", int, 256, "max sequences per step"),
    Flag("--max-num-batched-tokens", int, 8192, "token budget per step"),
    Flag("--max-model-len", int, 8192, "context length; longer requests fail with 400"),
    Flag("--speedup-ratio", float, 1.0, "divide modelled step times by this"),
    Flag("--prefix-caching", None, True, "prefix caching in the engines"),
    Flag("--router-mode", str, "kv", "how to pick a worker", REPLAY_ROUTER_MODES),
    Flag("--kv-overlap-score-weight", float, 1.0, "kv mode: weight of prefill blocks against decode blocks"),
    Flag("--router-temperature", float, 0.0, "kv modes: softmax sampling temperature (0 = argmin)"),
    Flag("--kv-events", None, True, "kv modes: index fed by KV events (off = approximate mode)"),
    Flag("--busy-decode-threshold", float, 0.0, "worker busy above this fraction of KV blocks (0 = off)"),
    Flag("--busy-prefill-frac", float, 0.0, "busy above this multiple of max_num_batched_tokens queued (0 = off)"),
    Flag("--router-queue-policy", str, "fcfs", "admission queue order when all workers are busy", QUEUE_POLICIES),
    Flag("--router-max-queue", int, 1024, "queued requests past this fail with 503"),
    Flag("--router-queue-timeout", float, 60.0, "seconds a request may wait for a free worker"),
    # the planner and the SLA
    Flag("--planner", str, "off", "planner mode (off: a static fleet)", PLANNER_MODES),
    Flag("--predictor", str, "constant", "load predictor of throughput mode", tuple(sorted(PREDICTORS))),
    Flag("--ttft-slo", float, 2.0, "SLA: time to first token (s)"),
    Flag("--itl-slo", float, 0.05, "SLA: mean inter-token latency of a request (s)"),
    Flag("--min-workers", int, 1, "planner: fewest workers"),
    Flag("--max-workers", int, 8, "planner: most workers"),
    Flag("--adjustment-interval", float, 60.0, "planner: seconds between decisions"),
    Flag("--worker-start-delay", float, 30.0, "planner: seconds before a new worker serves"),
    Flag("--target-utilization", float, 1.0, "planner, throughput mode: busy fraction a worker is sized for"),
    # output
    Flag("--out", str, None, "directory for report.json and timeline.png"),
    Flag("--label", str, "", "name of this run in the report"),
    Flag("--progress", None, True, "show a progress bar over virtual time"),
    Flag("--save-requests", None, False, "also write per-request results (requests.jsonl)"),
)


def add_replay_args(parser: argparse.ArgumentParser) -> None:
    """Register the `lightspeed replay` flags on `parser`."""
    add_flags(parser, FLAGS)


def config_from_args(args: argparse.Namespace) -> ReplayConfig:
    """Bind parsed flags to a validated ReplayConfig (ValueError names the bad value)."""
    trace = TraceSlice(
        path=args.trace or "",
        fmt=args.trace_format,
        speedup=args.speedup,
        start_s=args.trace_start,
        window_s=args.trace_window,
        num_requests=args.num_requests,
        max_output_tokens=args.max_output_tokens,
        duration_s=args.duration,
        seed=args.seed,
        vocab_size=args.vocab_size,
        min_token_id=args.min_token_id,
    )
    return ReplayConfig(
        trace=trace, fleet=_fleet(args), planner=_planner(args), label=args.label, progress=args.progress
    )


def _fleet(args: argparse.Namespace) -> FleetConfig:
    engine = EngineConfig(
        block_size=args.block_size,
        num_gpu_blocks=args.num_gpu_blocks,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=args.prefix_caching,
        max_model_len=args.max_model_len,
    )
    router = RouterConfig(
        overlap_score_weight=args.kv_overlap_score_weight,
        temperature=args.router_temperature,
        kv_events=args.kv_events,
        busy_decode_threshold=args.busy_decode_threshold,
        busy_prefill_frac=args.busy_prefill_frac,
        queue_policy=args.router_queue_policy,
        max_queue=args.router_max_queue,
        queue_timeout=args.router_queue_timeout,
    )
    return FleetConfig(args.workers, engine, args.speedup_ratio, args.router_mode, router)


def _planner(args: argparse.Namespace) -> PlannerSettings:
    return PlannerSettings(
        mode=args.planner,
        predictor=args.predictor,
        ttft_slo_s=args.ttft_slo,
        itl_slo_s=args.itl_slo,
        min_workers=args.min_workers,
        max_workers=args.max_workers,
        adjustment_interval_s=args.adjustment_interval,
        start_delay_s=args.worker_start_delay,
        target_utilization=args.target_utilization,
    )


def load_slice(trace: TraceSlice) -> MooncakeTrace | AzureTrace:
    """The trace rows the slice selects (prompts are built lazily while replaying)."""
    window = TraceWindow(trace.start_s, trace.window_s, trace.num_requests, trace.max_output_tokens)
    tokens = TokenSpace(trace.vocab_size, trace.min_token_id)
    return load_trace(trace.path, trace.fmt, seed=trace.seed, tokens=tokens, window=window)


def _expected_end(workload: MooncakeTrace | AzureTrace, trace: TraceSlice) -> float:
    arrivals = workload.arrivals if isinstance(workload, MooncakeTrace) else [r.arrival_s for r in workload.rows]
    span = (max(arrivals) - min(arrivals)) / trace.speedup if arrivals else 0.0
    return span if trace.duration_s is None else min(span, trace.duration_s)


def run_replay(cfg: ReplayConfig, command: str = "") -> tuple[ReplayReport, SimOutcome]:
    """Load the slice, simulate it, and build the report."""
    workload = load_slice(cfg.trace)
    outcome = Simulation(cfg, iter(workload), _expected_end(workload, cfg.trace)).run()
    return build_report(cfg, outcome, command), outcome


def replay_main(args: argparse.Namespace) -> int:
    """Run `lightspeed replay` from parsed args; returns a process exit code."""
    try:
        cfg = config_from_args(args)
        report, outcome = run_replay(cfg, "lightspeed " + shlex.join(sys.argv[1:]))
    except (ValueError, OSError) as exc:
        logger.error("replay: %s", exc)
        return 2
    sys.stdout.write(format_replay(report))
    if args.out:
        results = [r.result() for r in outcome.requests]
        path = write_replay(report, results, args.out, args.save_requests)
        logger.info("report written to %s", path)
    return 0 if report.summary.completed else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lightspeed replay", description="Virtual-time fleet simulation")
    add_replay_args(parser)
    parser.add_argument("--log-level", default=os.environ.get(env_name("--log-level"), "INFO").upper())
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    return replay_main(args)
