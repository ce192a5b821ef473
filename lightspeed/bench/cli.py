"""`lightspeed bench` flags and entry point; every flag also reads LIGHTSPEED_<FLAG>."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lightspeed.bench.config import MODES, TRACE_FORMATS, BenchConfig
from lightspeed.bench.report import BenchReport, format_summary
from lightspeed.bench.runner import run_bench

logger = logging.getLogger(__name__)

DEFAULT_SYNTHETIC_REQUESTS = 1000
_TRUE = ("1", "true", "yes", "on")


def env_name(flag: str) -> str:
    return "LIGHTSPEED_" + flag.lstrip("-").replace("-", "_").upper()


@dataclass(frozen=True, slots=True)
class Flag:
    """One flag of `lightspeed bench` (or `replay`); `type_` None makes a --x/--no-x boolean."""

    name: str
    type_: Callable[[str], Any] | None
    default: Any
    help: str
    choices: tuple[str, ...] | None = None


FLAGS = (
    Flag("--url", str, "http://127.0.0.1:8000", "server base URL (OpenAI-compatible)"),
    Flag("--model", str, None, "model name; default: the first one /v1/models lists"),
    Flag("--endpoint", str, "/v1/completions", "streaming completions path"),
    Flag("--mode", str, "auto", "closed (fixed concurrency) | open (arrival replay)", MODES),
    Flag("--concurrency", int, 32, "closed loop: requests in flight; open loop: cap (0=none)"),
    Flag("--num-requests", int, None, "measured requests (synthetic 1000; trace: all)"),
    Flag("--duration", float, None, "stop sending after this many seconds"),
    Flag("--warmup", int, 0, "requests sent first and excluded from the report"),
    Flag("--isl", int, 64, "synthetic input length in tokens"),
    Flag("--osl", int, 16, "synthetic output length in tokens"),
    Flag("--shared-prefix-ratio", float, 0.0, "fraction of each synthetic prompt shared by all"),
    Flag("--request-rate", float, 0.0, "synthetic Poisson arrival rate req/s (0 = closed)"),
    Flag("--trace", str, None, "Mooncake JSONL or Azure CSV trace to replay"),
    Flag("--trace-format", str, "auto", "trace format", TRACE_FORMATS),
    Flag("--speedup", float, 1.0, "divide trace inter-arrival times by this"),
    Flag("--trace-start", float, 0.0, "replay from this trace time (s)"),
    Flag("--trace-window", float, None, "replay only this many seconds of trace time"),
    Flag("--max-output-tokens", int, None, "cap each request's max_tokens"),
    Flag("--vocab-size", int, 49152, "prompt token ids are drawn below this"),
    Flag("--min-token-id", int, 100, "and at or above this (skips special tokens)"),
    Flag("--ignore-eos", None, True, "ask the server to ignore EOS (exact output lengths)"),
    Flag("--seed", int, 0, "seed for prompts and arrivals"),
    Flag("--timeout", float, 600.0, "per-request timeout (s)"),
    Flag("--api-key", str, None, "bearer token sent as Authorization"),
    Flag("--keepalive", None, True, "reuse connections (off: one connection per request)"),
    Flag("--session-ids", None, True, "send a trace's session ids as x-session-id"),
    Flag("--out", str, None, "directory for report.json and plots"),
    Flag("--label", str, "", "name of this run in the report"),
    Flag("--progress", None, True, "show a progress bar"),
    Flag("--save-requests", None, False, "also write per-request results (requests.jsonl)"),
)


def _add_flag(parser: argparse.ArgumentParser, flag: Flag) -> None:
    """Add a flag whose default comes from its env var when set (argparse applies `type_` to
    a string default, so env values are converted and validated like typed flags)."""
    env = env_name(flag.name)
    value: Any = os.environ.get(env)
    if value is not None and flag.type_ is None:
        value = value.strip().lower() in _TRUE
    default = flag.default if value is None else value
    help_ = f"{flag.help} [env {env}; default: {default}]"
    if flag.type_ is None:
        action = argparse.BooleanOptionalAction
        parser.add_argument(flag.name, action=action, default=default, help=help_)
    else:
        parser.add_argument(flag.name, type=flag.type_, default=default, help=help_, choices=flag.choices)


def add_flags(parser: argparse.ArgumentParser, flags: Sequence[Flag]) -> None:
    """Register `flags` on `parser` (also how `lightspeed replay` builds its own)."""
    for flag in flags:
        _add_flag(parser, flag)


def add_bench_args(parser: argparse.ArgumentParser) -> None:
    """Register the `lightspeed bench` flags on `parser`."""
    add_flags(parser, FLAGS)


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """Bind parsed flags to a validated BenchConfig (raises ValueError on bad values)."""
    num = args.num_requests
    if num is None and args.trace is None and args.duration is None:
        num = DEFAULT_SYNTHETIC_REQUESTS
    return BenchConfig(
        url=args.url,
        model=args.model,
        endpoint=args.endpoint,
        mode=args.mode,
        concurrency=args.concurrency,
        num_requests=num,
        duration_s=args.duration,
        warmup=args.warmup,
        isl=args.isl,
        osl=args.osl,
        shared_prefix_ratio=args.shared_prefix_ratio,
        request_rate=args.request_rate,
        trace=args.trace,
        trace_format=args.trace_format,
        speedup=args.speedup,
        trace_start_s=args.trace_start,
        trace_window_s=args.trace_window,
        max_output_tokens=args.max_output_tokens,
        vocab_size=args.vocab_size,
        min_token_id=args.min_token_id,
        ignore_eos=args.ignore_eos,
        seed=args.seed,
        timeout_s=args.timeout,
        api_key=args.api_key,
        keepalive=args.keepalive,
        session_ids=args.session_ids,
        out_dir=args.out,
        label=args.label,
        progress=args.progress,
        save_requests=args.save_requests,
    )


def _run(cfg: BenchConfig) -> BenchReport:
    try:
        import uvloop
    except ImportError:  # uvloop is a dependency; tolerate its absence on odd platforms
        return asyncio.run(run_bench(cfg))
    return uvloop.run(run_bench(cfg))


def bench_main(args: argparse.Namespace) -> int:
    """Run `lightspeed bench` from parsed args; returns a process exit code."""
    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        logger.error("invalid bench configuration: %s", exc)
        return 2
    report = _run(cfg)
    sys.stdout.write(format_summary(report))
    if cfg.out_dir:
        logger.info("report written to %s", cfg.out_dir)
    return 0 if report.summary.completed else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lightspeed bench", description="Load client and trace replay for OpenAI servers"
    )
    add_bench_args(parser)
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
        default=os.environ.get(env_name("--log-level"), "INFO").upper(),
        help="logging level [env LIGHTSPEED_LOG_LEVEL; default: INFO]",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    return bench_main(args)
