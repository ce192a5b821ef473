"""What every side-by-side benchmark script in bench/ shares: one `main()` (logging, flags, run,
result JSON, plot), servers as process groups, readiness polling, Dynamo's loopback settings,
Params dataclasses as CLI flags, and result files that record the exact command and the hardware.

A script declares a `Script` (its Params dataclass, its own flags, its `run`, its default result
path, its plot and its log summary) and ends with `raise SystemExit(main(SCRIPT))`.

The scripts run from a checkout (`.venv/bin/python bench/NAME.py`), so Python puts bench/ on the
path and `import harness` works without installing anything.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import inspect
import logging
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Generic, TypeVar

import aiohttp
import msgspec

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / ".work"
RESULTS = ROOT / "bench" / "results"
if str(ROOT) not in sys.path:  # the lightspeed package, without installing it
    sys.path.insert(0, str(ROOT))

from lightspeed.native.cpu_caps import cpuinfo_fields  # noqa: E402 -- needs the path set just above

logger = logging.getLogger("bench.harness")

T = TypeVar("T")
P = TypeVar("P")
R = TypeVar("R")

STOP_TIMEOUT_S = 30.0
# Servers that load real weights: vLLM compiles its model at start (~100 s here, more under load).
MODEL_READY_TIMEOUT_S = 400.0
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

# Loopback for every internal plane: by default Dynamo advertises the host's public address
# for its TCP request plane and ZMQ event plane. DYN_SELF_HOST_METADATA=0 silences a warning.
DYNAMO_ENV = {
    "DYN_TCP_RPC_HOST": "127.0.0.1",
    "DYN_EVENT_PLANE_HOST": "127.0.0.1",
    "DYN_TCP_RESPONSE_STREAM_HOST": "127.0.0.1",
    "DYN_SELF_HOST_METADATA": "0",
}
DYNAMO_PLANES = {"--discovery-backend": "file", "--request-plane": "tcp", "--event-plane": "zmq"}

# Environment that changes which kernels torch / oneDNN / OpenMP / our C kernels pick: numbers
# from runs with different settings are not comparable, so every result records the ones set.
ISA_ENV = (
    "ATEN_CPU_CAPABILITY",
    "ONEDNN_MAX_CPU_ISA",
    "DNNL_MAX_CPU_ISA",
    "ONEDNN_DEFAULT_FPMATH_MODE",
    "MKL_ENABLE_INSTRUCTIONS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "GOMP_CPU_AFFINITY",
    "KMP_AFFINITY",
    "LIGHTSPEED_PAGED_ATTENTION",
    "LIGHTSPEED_KERNEL_ISA",
)
LIBRARIES = ("msgspec", "xxhash", "aiohttp", "uvloop", "numpy", "torch")


# ---------------------------------------------------------------------------- services


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


def lightspeed_serve(
    name: str, engine: str, port: int, serve_flags: dict[str, object], log_dir: Path, extra: Sequence[str] = ()
) -> Service:
    """`lightspeed serve --engine ENGINE` with `serve_flags` (which carry `--port port`), in order."""
    cmd = [sys.executable, "-m", "lightspeed", "serve", "--engine", engine, *flags(serve_flags), *extra]
    return Service(name, f"http://127.0.0.1:{port}", [cmd], dict(os.environ), log_dir)


def native_service(
    name: str, dtype: str, log_dir: Path, discovery_dir: Path, extra: list[str] | None = None, max_batched: int = 2048
) -> Service:
    """`lightspeed serve --engine native` with one worker on the packaged model."""
    port = free_port()
    serve_flags: dict[str, object] = {
        "--workers": 1,
        "--dtype": dtype,
        "--max-num-batched-tokens": max_batched,
        "--host": "127.0.0.1",
        "--port": port,
        "--discovery-path": discovery_dir,
    }
    return lightspeed_serve(name, "native", port, serve_flags, log_dir, extra or [])


def dynamo_service(
    name: str, log_dir: Path, kv_dir: Path, venv: Path, router_mode: str, mocker_flags: dict[str, object]
) -> Service:
    """Dynamo's frontend on a free loopback port plus one `dynamo.mocker` process (from the venv
    bench/setup_dynamo.sh makes), every plane on loopback, discovery through files in kv_dir."""
    port = free_port()
    py = str(Path(venv) / "bin" / "python")
    frontend_flags = {"--http-host": "127.0.0.1", "--http-port": port, "--router-mode": router_mode}
    frontend = [py, "-m", "dynamo.frontend", *flags({**frontend_flags, **DYNAMO_PLANES})]
    mocker = [py, "-m", "dynamo.mocker", *flags({**mocker_flags, **DYNAMO_PLANES})]
    env = {**os.environ, **DYNAMO_ENV, "DYN_FILE_KV": str(kv_dir)}
    return Service(name, f"http://127.0.0.1:{port}", [frontend, mocker], env, log_dir)


async def poll_until(
    service: Service,
    probe: Callable[[aiohttp.ClientSession], Awaitable[R | None]],
    timeout_s: float,
    failure: str,
    poll_s: float = 0.5,
    retry_on: tuple[type[BaseException], ...] = (TimeoutError, aiohttp.ClientError, ValueError),
) -> R:
    """Call `probe` every `poll_s` until it returns something other than None (a `retry_on`
    error counts as None) while the service stays alive; RuntimeError(`failure`) at timeout."""
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        while time.monotonic() < deadline:
            service.check_alive()
            try:
                result = await probe(session)
                if result is not None:
                    return result
            except retry_on:
                pass
            await asyncio.sleep(poll_s)
    raise RuntimeError(failure)


async def wait_for_model(service: Service, timeout_s: float, poll_s: float = 0.5) -> str:
    """Poll /v1/models until the server lists a model; returns its id."""

    async def first_model(session: aiohttp.ClientSession) -> str | None:
        async with session.get(service.url + "/v1/models") as resp:
            data = (await resp.json()).get("data", []) if resp.status == 200 else []
        return str(data[0]["id"]) if data else None

    failure = f"{service.name} did not list a model within {timeout_s} s"
    return await poll_until(service, first_model, timeout_s, failure, poll_s, (TimeoutError, aiohttp.ClientError))


async def wait_for_workers(service: Service, workers: int, timeout_s: float, poll_s: float = 0.5) -> None:
    """Poll a Lightspeed frontend's /health until it lists `workers` workers."""

    async def enough(session: aiohttp.ClientSession) -> bool | None:
        async with session.get(service.url + "/health") as resp:
            health = await resp.json(content_type=None)
        return True if len(health.get("workers") or []) >= workers else None

    await poll_until(service, enough, timeout_s, f"{service.name}: workers not ready", poll_s)


async def wait_model_ready(service: Service, timeout_s: float = MODEL_READY_TIMEOUT_S) -> str:
    """`wait_for_model` for servers that load real weights (native engine, vLLM): slow to start."""
    return await wait_for_model(service, timeout_s, poll_s=1.0)


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


# ---------------------------------------------------------------------------- processes


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid` (every thread's children list)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out += [int(x) for x in text]
    return out


def find_roles(serve_pid: int, roles_wanted: Sequence[str] = ("worker", "frontend")) -> dict[str, int]:
    """The worker and frontend processes the serve supervisor started, by their argv."""
    roles: dict[str, int] = {}
    for pid in child_pids(serve_pid):
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        for role in roles_wanted:
            if role.encode() in argv[:5]:  # python -m lightspeed <role> ...
                roles.setdefault(role, pid)
    return roles


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmRSS for pid {pid}")


# ---------------------------------------------------------------------------- flags


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


# ---------------------------------------------------------------------------- the script


@dataclass(frozen=True)
class Smoke:
    """A `--smoke` flag: tiny scale (`overrides` of the Params fields, whatever else is given)
    and a result under bench/.work/ (`NAME_smoke.json`) instead of bench/results/`NAME.json`."""

    name: str
    overrides: dict[str, Any]

    def add_flags(self, ap: argparse.ArgumentParser) -> None:
        ap.add_argument(
            "--smoke", action="store_true", help=f"tiny scale ({self.overrides}), writes under bench/.work/"
        )

    def check(self, args: argparse.Namespace, p: P) -> P:
        return dataclasses.replace(p, **self.overrides) if args.smoke else p  # type: ignore[type-var]  # P is a Params dataclass

    def result_path(self, args: argparse.Namespace) -> Path:
        return WORK / f"{self.name}_smoke.json" if args.smoke else RESULTS / f"{self.name}.json"


@dataclass(frozen=True)
class Script(Generic[P, R]):
    """What a bench script declares; `main` does the rest."""

    name: str  # the script's file stem; also its logger's name
    doc: str | None
    params: type[P]  # a frozen dataclass: one flag per field
    run: Callable[[argparse.Namespace, P], Awaitable[R] | R]  # the measurement; returns the payload
    result_path: Callable[[argparse.Namespace], Path]  # default JSON path (its name is kept with --out DIR)
    add_flags: Callable[[argparse.ArgumentParser], None] | None = None  # the script's own flags
    # Validates flags beyond Params (ValueError = usage error) and may adjust the params.
    check: Callable[[argparse.Namespace, P], P] | None = None
    plot: Callable[[R, Path], None] | None = None  # (payload, PNG path next to the JSON)
    summarize: Callable[[R], None] | None = None  # logs the headline numbers


def build_parser(script: Script[Any, Any]) -> argparse.ArgumentParser:
    """The Params flags, the script's own, then the ones every script has."""
    ap = argparse.ArgumentParser(
        prog=f"{script.name}.py", description=script.doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_param_flags(ap, script.params)
    if script.add_flags is not None:
        script.add_flags(ap)
    common = ap.add_argument_group("every bench script")
    common.add_argument(
        "--out",
        default=None,
        help="result JSON file (NAME.json), or a folder to write the default file name into "
        f"(default: under {RESULTS.relative_to(ROOT)}/); the plot goes next to it as .png",
    )
    common.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS)
    return ap


def parse(script: Script[P, Any], argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, P]:
    ap = build_parser(script)
    args = ap.parse_args(argv)
    try:
        params = params_from(args, script.params)
        if script.check is not None:
            params = script.check(args, params)
    except ValueError as exc:
        ap.error(str(exc))
    return args, params


def output_path(script: Script[Any, Any], args: argparse.Namespace) -> Path:
    """--out as given when it names a .json file; else the default file name in --out (a folder)."""
    default = script.result_path(args)
    if args.out is None:
        return default
    out = Path(args.out)
    return out if out.suffix == ".json" else out / default.name


def run_script(script: Script[P, R], args: argparse.Namespace, params: P) -> R:
    """Run the measurement; a coroutine runs on uvloop (what the load client is tuned for)."""
    result = script.run(args, params)
    if inspect.iscoroutine(result):
        import uvloop

        return uvloop.run(result)  # type: ignore[no-any-return]
    return result  # type: ignore[return-value]


def main(script: Script[Any, Any], argv: Sequence[str] | None = None) -> int:
    """Parse flags, set up logging, run, write the result JSON (+ plot), log the summary."""
    args, params = parse(script, argv)
    configure_logging(args.log_level)
    started = now_iso()
    payload = run_script(script, args, params)
    path = output_path(script, args)
    write_result(payload, path, started_at=started)
    if script.plot is not None:
        script.plot(payload, path.with_suffix(".png"))
    if script.summarize is not None:
        script.summarize(payload)
    logger.info("wrote %s", path)
    return 0


# ---------------------------------------------------------------------------- results


def command_line() -> str:
    """The exact command, including the `flock` bench-lock wrapper when that is our parent."""
    own = shlex.join([sys.executable, *sys.argv])
    try:
        parent = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().split(b"\0")[:-1]
    except OSError:
        return own
    words = [w.decode(errors="replace") for w in parent]
    return shlex.join(words) if words and Path(words[0]).name == "flock" else own


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def cpu_info(path: Path = Path("/proc/cpuinfo")) -> dict[str, str]:
    """`model name` and `flags` of the first processor (all cores of a VM report the same)."""
    try:
        model, flags = cpuinfo_fields(path.read_text())
    except OSError:
        model, flags = "", ""
    return {"model": model or "unknown", "flags": flags}


def _library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        with contextlib.suppress(PackageNotFoundError):
            versions[name] = version(name)
    return versions


def machine_info() -> dict[str, object]:
    """The hardware and software a result was measured on."""
    cpu = cpu_info()
    return {
        "cpu": cpu["model"],
        "cpu_flags": cpu["flags"],
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "isa_env": {name: os.environ[name] for name in ISA_ENV if name in os.environ},
        "python": platform.python_version(),
        "platform": platform.platform(),
        "libraries": _library_versions(),
        # Other processes on a shared machine slow every number down: say how busy it was.
        "loadavg_1m_5m_15m_at_end": [round(x, 2) for x in os.getloadavg()],
    }


def write_result(payload: object, path: Path, started_at: str | None = None) -> dict[str, Any]:
    """The result JSON: command line, start / end time, machine, then the script's payload."""
    body = msgspec.to_builtins(payload)
    if not isinstance(body, dict):
        raise TypeError(f"a result payload must encode to a JSON object, not {type(body).__name__}")
    header: dict[str, Any] = {
        "command": command_line(),
        "started_at": started_at or now_iso(),
        "finished_at": now_iso(),
        "machine": machine_info(),
    }
    clash = header.keys() & body.keys()
    if clash:
        raise ValueError(f"payload fields {sorted(clash)} are the harness's to write")
    doc = header | body
    write_json(doc, path)
    return doc


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


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
