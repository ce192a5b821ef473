"""`lightspeed` command line: serve | frontend | worker | bench.

Every flag also reads `LIGHTSPEED_<FLAG>` (dashes as underscores, upper case) as its default,
so deployments can configure processes through the environment.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from lightspeed.config import (
    DISCOVERY_KINDS,
    DTYPES,
    ENGINE_KINDS,
    EVENT_PLANE_KINDS,
    QUEUE_POLICIES,
    ROLES,
    ROUTER_MODES,
    FrontendConfig,
    PlaneConfig,
    RouterConfig,
    ServeConfig,
    WorkerConfig,
)


def _env_default(flag: str, default: Any, conv: Callable[[str], Any]) -> Any:
    raw = os.environ.get("LIGHTSPEED_" + flag.lstrip("-").replace("-", "_").upper())
    if raw is None:
        return default
    try:
        return conv(raw)
    except ValueError:
        raise SystemExit(f"invalid value {raw!r} in environment for {flag}") from None


def _bool(raw: str) -> bool:
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


def add_flag(
    p: argparse.ArgumentParser,
    flag: str,
    conv: Callable[[str], Any],
    default: Any,
    help: str,
    choices: tuple[str, ...] | None = None,
) -> None:
    env = "LIGHTSPEED_" + flag.lstrip("-").replace("-", "_").upper()
    p.add_argument(
        flag,
        type=conv,
        default=_env_default(flag, default, conv),
        choices=choices,
        help=f"{help} (env {env}; default {default!r})",
    )


def add_plane_flags(p: argparse.ArgumentParser, default_discovery: str = "file") -> None:
    add_flag(p, "--discovery", str, default_discovery, "service discovery backend", DISCOVERY_KINDS)
    add_flag(p, "--discovery-path", str, "", "folder of the file discovery backend")
    add_flag(p, "--discovery-ttl", float, 10.0, "seconds before a silent worker's entry expires")
    add_flag(p, "--event-plane", str, "zmq", "event plane transport", EVENT_PLANE_KINDS)
    add_flag(p, "--namespace", str, "lightspeed", "namespace shared by frontends and workers")


def add_frontend_flags(p: argparse.ArgumentParser) -> None:
    add_flag(p, "--host", str, "127.0.0.1", "HTTP listen address")
    add_flag(p, "--port", int, 8000, "HTTP port")
    add_flag(p, "--router-mode", str, "round-robin", "how to pick a worker", ROUTER_MODES)
    add_flag(p, "--max-body-bytes", int, 8 * 1024 * 1024, "largest accepted request body")
    add_flag(p, "--frontend-processes", int, 1, "frontend processes sharing the port (SO_REUSEPORT)")
    add_flag(p, "--migration-limit", int, 0, "times a request may move to another worker if its worker dies")
    add_router_flags(p)


def add_router_flags(p: argparse.ArgumentParser) -> None:
    add_flag(p, "--kv-overlap-score-weight", float, 1.0, "kv mode: weight of prefill blocks against decode blocks")
    add_flag(p, "--router-temperature", float, 0.0, "kv modes: softmax sampling temperature (0 = argmin)")
    add_flag(p, "--kv-events", _bool, True, "kv modes: index fed by worker KV events (false = approximate mode)")
    add_flag(p, "--router-approx-ttl", float, 120.0, "approximate mode: seconds a routed prefix counts as cached")
    add_flag(p, "--busy-decode-threshold", float, 0.0, "worker busy above this fraction of KV blocks active (0 = off)")
    add_flag(
        p,
        "--busy-prefill-frac",
        float,
        0.0,
        "worker busy above this multiple of max_num_batched_tokens queued for prefill (0 = off)",
    )
    add_flag(p, "--router-queue-policy", str, "fcfs", "admission queue order when all workers are busy", QUEUE_POLICIES)
    add_flag(p, "--router-max-queue", int, 1024, "queued requests past this are refused with 503")
    add_flag(p, "--router-queue-timeout", float, 60.0, "seconds a request may wait for a free worker")
    add_flag(p, "--session-ttl", float, 600.0, "seconds a session (x-session-id) stays bound to its worker")
    add_flag(p, "--router-replica-sync", _bool, True, "share active load with other frontends (event plane)")


def add_worker_flags(p: argparse.ArgumentParser) -> None:
    add_flag(p, "--engine", str, "native", "engine: native (PyTorch model) or mocker (simulated)", ENGINE_KINDS)
    add_flag(p, "--model", str, "", "model folder, .gguf file or packaged model name ('' = SmolLM2-135M-Instruct)")
    add_flag(p, "--served-model-name", str, "", "name clients use (default: the model's name)")
    add_flag(p, "--block-size", int, 64, "tokens per KV block")
    add_flag(p, "--num-gpu-blocks", int, 0, "KV cache size in blocks (0 = mocker 16384, native from --kv-cache-gb)")
    add_flag(p, "--kv-cache-gb", float, 0.0, "native engine: KV cache size in GB when --num-gpu-blocks is 0 (0 = 2 GB)")
    add_flag(
        p, "--dtype", str, "auto", "native engine weights/KV dtype (auto: float32 on CPU, bfloat16 on CUDA)", DTYPES
    )
    add_flag(p, "--max-num-seqs", int, 256, "max sequences per step")
    add_flag(p, "--max-num-batched-tokens", int, 8192, "token budget per step")
    add_flag(p, "--max-model-len", int, 0, "context length (0 = the model's)")
    add_flag(p, "--speedup-ratio", float, 1.0, "mocker: divide modelled step times by this")
    add_flag(p, "--enable-prefix-caching", _bool, True, "reuse KV blocks of shared prefixes")
    add_flag(p, "--seed", int, 0, "engine random seed")


def _planes(a: argparse.Namespace) -> PlaneConfig:
    return PlaneConfig(
        discovery=a.discovery,
        discovery_path=a.discovery_path,
        discovery_ttl=a.discovery_ttl,
        event_plane=a.event_plane,
        namespace=a.namespace,
    )


def frontend_config(a: argparse.Namespace) -> FrontendConfig:
    return FrontendConfig(
        host=a.host,
        port=a.port,
        router_mode=a.router_mode,
        planes=_planes(a),
        max_body_bytes=a.max_body_bytes,
        processes=a.frontend_processes,
        migration_limit=a.migration_limit,
        router=router_config(a),
    )


def router_config(a: argparse.Namespace) -> RouterConfig:
    return RouterConfig(
        overlap_score_weight=a.kv_overlap_score_weight,
        temperature=a.router_temperature,
        kv_events=a.kv_events,
        approx_ttl=a.router_approx_ttl,
        busy_decode_threshold=a.busy_decode_threshold,
        busy_prefill_frac=a.busy_prefill_frac,
        queue_policy=a.router_queue_policy,
        max_queue=a.router_max_queue,
        queue_timeout=a.router_queue_timeout,
        session_ttl=a.session_ttl,
        replica_sync=a.router_replica_sync,
    )


def worker_config(a: argparse.Namespace) -> WorkerConfig:
    return WorkerConfig(
        engine=a.engine,
        model=a.model,
        served_model_name=a.served_model_name,
        role=a.role,
        host=a.worker_host,
        planes=_planes(a),
        block_size=a.block_size,
        num_gpu_blocks=a.num_gpu_blocks,
        max_num_seqs=a.max_num_seqs,
        max_num_batched_tokens=a.max_num_batched_tokens,
        max_model_len=a.max_model_len,
        speedup_ratio=a.speedup_ratio,
        kv_cache_gb=a.kv_cache_gb,
        dtype=a.dtype,
        enable_prefix_caching=a.enable_prefix_caching,
        seed=a.seed,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightspeed", description="LLM inference serving framework")
    add_flag(parser, "--log-level", str, "INFO", "logging level")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="frontend + N local workers in one command (no external servers)")
    add_frontend_flags(serve)
    add_worker_flags(serve)
    add_plane_flags(serve)
    add_flag(serve, "--workers", int, 1, "number of worker processes")
    serve.set_defaults(role="agg", worker_host="127.0.0.1")

    front = sub.add_parser("frontend", help="OpenAI-compatible HTTP frontend and router")
    add_frontend_flags(front)
    add_plane_flags(front)

    worker = sub.add_parser("worker", help="one engine worker")
    add_worker_flags(worker)
    add_plane_flags(worker)
    add_flag(worker, "--role", str, "agg", "worker role", ROLES)
    add_flag(worker, "--worker-host", str, "127.0.0.1", "request-plane listen address")

    bench = sub.add_parser("bench", help="load client / trace replay against an OpenAI server")
    from lightspeed.bench.cli import add_bench_args

    add_bench_args(bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s"
    )
    try:
        return _dispatch(args)
    except ValueError as err:  # config validation
        logging.getLogger("lightspeed").error("%s", err)
        return 2
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    import uvloop

    if args.command == "bench":
        from lightspeed.bench.cli import bench_main

        return bench_main(args)
    if args.command == "frontend":
        from lightspeed.frontend.server import run_frontend

        uvloop.run(run_frontend(frontend_config(args)))
    elif args.command == "worker":
        from lightspeed.worker.process import run_worker

        uvloop.run(run_worker(worker_config(args)))
    else:
        from lightspeed.serve import run_serve

        cfg = ServeConfig(frontend_config(args), worker_config(args), args.workers)
        return uvloop.run(run_serve(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
