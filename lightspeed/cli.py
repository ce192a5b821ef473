"""`lightspeed` command line: serve | frontend | worker | bench | profile.

The flags of serve, frontend and worker are generated from their config dataclasses
(config.py, options.py). A value comes from the flag, else `LIGHTSPEED_<FLAG>` in the
environment, else the `--config` YAML file, else the field's default. Booleans are
`--flag` / `--no-flag`; `--log-level` goes before or after the subcommand.

`serve` hands each child process its whole config as JSON in `LIGHTSPEED_CHILD_CONFIG`; a child
that finds it uses exactly that config, ignoring its own flags, environment and config file.
A configuration error (bad value, unknown model, unreadable config file) exits with status 2,
which the supervisor takes as "do not restart".
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from lightspeed.config import (
    CHILD_CONFIG_ENV,
    CONFIG_ERROR_EXIT,
    AnyConfig,
    ConfigError,
    FrontendConfig,
    ServeConfig,
    WorkerConfig,
    decode_config,
)
from lightspeed.options import (
    FlagSpec,
    HelpFormatter,
    add_flags,
    build_config,
    check_file_keys,
    flag_specs,
    load_config_file,
    resolve,
)

log = logging.getLogger("lightspeed")

CONFIG_FILE_ENV = "LIGHTSPEED_CONFIG"
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
LOG_LEVEL = FlagSpec("--log-level", (), LogLevel, "INFO", "logging level")


@dataclass(frozen=True)
class Command:
    help: str
    config: type[ServeConfig] | type[FrontendConfig] | type[WorkerConfig]
    hide: tuple[str, ...] = ()  # dotted field paths this command sets itself, so they get no flag

    def specs(self) -> tuple[FlagSpec, ...]:
        return flag_specs(self.config, self.hide)


COMMANDS = {
    # serve's workers are local aggregated workers on ephemeral loopback ports; the frontend
    # shows whatever name the workers register.
    "serve": Command(
        "frontend + N local workers in one command (no external servers)",
        ServeConfig,
        ("worker.role", "worker.host", "worker.port", "worker.health_port", "frontend.served_model_name"),
    ),
    "frontend": Command("OpenAI-compatible HTTP frontend and router", FrontendConfig),
    "worker": Command("one engine worker", WorkerConfig),
}


@dataclass(frozen=True)
class Invocation:
    """A parsed command line with every option resolved."""

    command: str
    log_level: str
    config: AnyConfig | None  # None for bench and profile, which keep their own flags
    args: argparse.Namespace


def version() -> str:
    try:
        return importlib.metadata.version("lightspeed")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightspeed", description="LLM inference serving framework", formatter_class=HelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    add_flags(parser, [LOG_LEVEL])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, formatter_class=HelpFormatter)
        add_flags(p, [LOG_LEVEL, *cmd.specs()])
        p.add_argument(
            "--config",
            metavar="FILE",
            default=argparse.SUPPRESS,
            help=f"YAML file of option: value for any flag above; flags and environment win (env {CONFIG_FILE_ENV})",
        )
    from lightspeed.bench.cli import add_bench_args

    bench = sub.add_parser("bench", help="load client / trace replay against an OpenAI server")
    add_bench_args(bench)
    add_flags(bench, [LOG_LEVEL])
    from lightspeed.planner.profile_cli import add_profile_args

    profile = sub.add_parser(
        "profile", help="measure an engine's step times and fit its step-time model", formatter_class=HelpFormatter
    )
    add_profile_args(profile)
    add_flags(profile, [LOG_LEVEL])
    from lightspeed.sim.cli import add_replay_args

    replay = sub.add_parser("replay", help="virtual-time simulation of a fleet (router, engines, planner) on a trace")
    add_replay_args(replay)
    add_flags(replay, [LOG_LEVEL])
    from lightspeed.planner.planner_cli import add_planner_args

    planner = sub.add_parser(
        "planner",
        help="SLA planner: observe the fleet, decide replicas, act (virtual | kubernetes)",
        formatter_class=HelpFormatter,
    )
    add_planner_args(planner)
    add_flags(planner, [LOG_LEVEL])
    return parser


def parse_invocation(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Invocation:
    """Parse argv and resolve every option; ValueError names a bad value, file or key."""
    env = os.environ if environ is None else environ
    args = build_parser().parse_args(argv)
    given = vars(args)
    cmd = COMMANDS.get(args.command)
    if cmd is None:  # bench keeps its own flags
        return Invocation(args.command, _log_level(given, env), None, args)
    child = env.get(CHILD_CONFIG_ENV)
    if child is not None:  # a child of serve: exactly the config it was handed
        return Invocation(args.command, _log_level(given, env), decode_config(child, cmd.config), args)
    specs = cmd.specs()
    values = resolve([LOG_LEVEL, *specs], given, env, _config_file(given, env, [LOG_LEVEL, *specs], args.command))
    level = values.pop("log_level", LOG_LEVEL.default)
    return Invocation(args.command, level, build_config(cmd.config, specs, values), args)


def _log_level(given: Mapping[str, Any], env: Mapping[str, str]) -> str:
    level: str = resolve([LOG_LEVEL], given, env, {}).get("log_level", LOG_LEVEL.default)
    return level


def _config_file(
    given: Mapping[str, Any], env: Mapping[str, str], specs: list[FlagSpec], command: str
) -> dict[str, Any]:
    path = given.get("config", env.get(CONFIG_FILE_ENV))
    if not path:
        return {}
    data = load_config_file(path)
    check_file_keys(path, data, specs, command)
    return data


def main(argv: list[str] | None = None) -> int:
    try:
        inv = parse_invocation(argv)
    except ValueError as err:
        _setup_logging(LOG_LEVEL.default)
        log.error("configuration error: %s", err)
        return CONFIG_ERROR_EXIT
    _setup_logging(inv.log_level)
    try:
        return _dispatch(inv)
    except ConfigError as err:  # found while starting, e.g. an unknown model
        log.error("configuration error: %s", err)
        return CONFIG_ERROR_EXIT
    except KeyboardInterrupt:
        return 130


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s")


def _dispatch(inv: Invocation) -> int:
    import uvloop

    from lightspeed.runtime.heartbeat import with_heartbeat  # to `serve`, when it started us

    cfg = inv.config
    if inv.command == "planner":
        from lightspeed.planner.planner_cli import planner_main

        return planner_main(inv.args)
    if inv.command == "replay":
        from lightspeed.sim.cli import replay_main

        return replay_main(inv.args)
    if inv.command == "profile":
        from lightspeed.planner.profile_cli import profile_main

        return profile_main(inv.args)
    if cfg is None:
        from lightspeed.bench.cli import bench_main

        return bench_main(inv.args)
    if isinstance(cfg, FrontendConfig):
        from lightspeed.frontend.process import run_frontend

        uvloop.run(with_heartbeat(run_frontend(cfg)))
    elif isinstance(cfg, WorkerConfig):
        from lightspeed.worker.process import run_worker

        uvloop.run(with_heartbeat(run_worker(cfg)))
    else:
        from lightspeed.serve import run_serve

        return uvloop.run(run_serve(cfg, inv.log_level))
    return 0


if __name__ == "__main__":
    sys.exit(main())
