"""What every side-by-side benchmark script in bench/ needs: servers as process groups, readiness
polling, Dynamo's loopback settings, Params dataclasses as CLI flags, and result files that record
the exact command and machine.

The scripts run from a checkout (`.venv/bin/python bench/NAME.py`), so Python puts bench/ on the
path and `import harness` works without installing anything.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import msgspec

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / ".work"
RESULTS = ROOT / "bench" / "results"
if str(ROOT) not in sys.path:  # the lightspeed package, without installing it
    sys.path.insert(0, str(ROOT))

logger = logging.getLogger("bench.harness")

T = TypeVar("T")
P = TypeVar("P")

STOP_TIMEOUT_S = 30.0

# Loopback for every internal plane: by default Dynamo advertises the host's public address
# for its TCP request plane and ZMQ event plane. DYN_SELF_HOST_METADATA=0 silences a warning.
DYNAMO_ENV = {
    "DYN_TCP_RPC_HOST": "127.0.0.1",
    "DYN_EVENT_PLANE_HOST": "127.0.0.1",
    "DYN_TCP_RESPONSE_STREAM_HOST": "127.0.0.1",
    "DYN_SELF_HOST_METADATA": "0",
}
DYNAMO_PLANES = {"--discovery-backend": "file", "--request-plane": "tcp", "--event-plane": "zmq"}


@dataclass
class Service:
    """A server made of local processes, reachable at `url` once it lists a model."""

    name: str
    url: str
    commands: list[list[str]]
    env: dict[str, str]
    log_dir: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for i, cmd in enumerate(self.commands):
            logger.info("start %s: %s", self.name, shlex.join(cmd))
            # Own process group, so stop() reaches the children a launcher spawns. The child
            # holds its own copy of the log descriptor, so ours closes right away.
            with open(self.log_dir / f"{self.name}-{i}.log", "wb") as log:
                proc = subprocess.Popen(
                    cmd, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            self.procs.append(proc)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("%s pid %d ignored SIGTERM; killing", self.name, proc.pid)
                signal_group(proc, signal.SIGKILL)
                proc.wait()

    def check_alive(self) -> None:
        for proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {proc.returncode}; see {self.log_dir}")


def signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def flags(values: dict[str, object]) -> list[str]:
    """{"--flag": value} as argv words."""
    return [part for flag, value in values.items() for part in (flag, str(value))]


async def wait_for_model(service: Service, timeout_s: float, poll_s: float = 0.5) -> str:
    """Poll /v1/models until the server lists a model; returns its id."""
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        while time.monotonic() < deadline:
            service.check_alive()
            try:
                async with session.get(service.url + "/v1/models") as resp:
                    data = (await resp.json()).get("data", []) if resp.status == 200 else []
                if data:
                    return str(data[0]["id"])
            except (TimeoutError, aiohttp.ClientError):
                pass
            await asyncio.sleep(poll_s)
    raise RuntimeError(f"{service.name} did not list a model within {timeout_s} s")


async def with_service(
    service: Service, ready: Callable[[Service], Awaitable[object]], body: Callable[[str], Awaitable[T]]
) -> T:
    """Start `service`, wait until `ready`, run `body(url)`, and always stop it."""
    try:
        service.start()
        await ready(service)
        return await body(service.url)
    finally:
        service.stop()


def add_param_flags(ap: argparse.ArgumentParser, params_type: type[Any]) -> None:
    """One `--kebab-name` flag per field of a Params dataclass, defaulting to its default."""
    defaults = params_type()
    for f in dataclasses.fields(params_type):
        default = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        else:
            ap.add_argument(flag, type=type(default), default=default, help=f"default {default!r}")


def params_from(args: argparse.Namespace, params_type: Callable[..., P]) -> P:
    """The Params dataclass built (and so validated) from the parsed flags."""
    names = [f.name for f in dataclasses.fields(params_type)]  # type: ignore[arg-type]
    return params_type(**{name: getattr(args, name) for name in names})


def parse_params(
    doc: str | None,
    params_type: Callable[..., P],
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
    argv: list[str] | None = None,
) -> tuple[argparse.Namespace, P]:
    """A parser with the Params flags plus the script's own (`extra`), parsed."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_param_flags(ap, params_type)  # type: ignore[arg-type]
    if extra is not None:
        extra(ap)
    args = ap.parse_args(argv)
    try:
        return args, params_from(args, params_type)
    except ValueError as exc:
        ap.error(str(exc))


def command_line() -> str:
    """The exact command, including the `flock` bench-lock wrapper when that is our parent."""
    own = shlex.join([sys.executable, *sys.argv])
    try:
        parent = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().split(b"\0")[:-1]
    except OSError:
        return own
    words = [w.decode(errors="replace") for w in parent]
    return shlex.join(words) if words and Path(words[0]).name == "flock" else own


def write_json(report: object, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(msgspec.json.format(msgspec.json.encode(report), indent=2) + b"\n")


def pyplot() -> Any | None:
    """matplotlib's pyplot on the Agg backend, or None (no PNG) when it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib not installed: no PNG")
        return None
    return plt


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
