"""Faults of a cluster made of real processes, each stream checked token by token against the
mocker's seeded stream (a request with a `seed` gets tokens fixed by (seed, position) on any
worker, so a migrated stream must equal the one a single worker would have sent):

* a worker SIGKILLed mid-stream on etcd + NATS, with `--migration-limit`: one unbroken stream;
* a worker whose request-plane port is firewalled (iptables DROP inside its network namespace):
  the frontend's dial times out, or (slow) the kernel aborts its open connection, it marks the
  worker unhealthy and serves on the other one;
* garbage bytes, a 4 GB length prefix (4- and 8-byte) and a ZMTP greeting announcing a 4 GB
  frame, sent to every TCP port each process of a fleet listens on (request plane, ZMQ event
  publishers, worker health port, HTTP; with `native` the KV transfer server of a prefill
  worker too): every process survives, stays small and keeps serving exact streams.

Not repeated here (covered elsewhere): a restarted frontend rebuilding its index from JetStream
and NATS / etcd restarts (test_cluster_etcd_nats.py), an unauthenticated request-plane caller
(test_cluster_secret.py), migration on file discovery (test_fault_tolerance.py).
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.integration.cluster_servers import (
    EtcdServer,
    NatsServer,
    cluster_flags,
    etcd_server,  # noqa: F401 (fixture)
    find_binary,
    free_port,
    lightspeed_cmd,
    nats_server,  # noqa: F401 (fixture)
    require_binary,
    start_process,
    stop_process,
)
from tests.integration.conftest import MODEL, NATIVE_ARGS, Server, start_serve, stop_serve

SECRET = "cluster-faults-test-secret-0123456789"
BS = 16
MOCKER = ["--engine", "mocker", "--block-size", str(BS), "--num-gpu-blocks", "1024"]
BENCH = Path(__file__).resolve().parents[2] / "bench"


@functools.cache
def seeded() -> Any:
    """bench/fault_soak.py's `SeededStreams` (the soak checks its streams the same way)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import fault_soak

    return fault_soak.SeededStreams()


def expected_text(prompt: list[int], seed: int, max_tokens: int) -> str:
    return str(seeded().text(len(prompt), seed, max_tokens))


def prompt_of(k: int, n: int = 4 * BS) -> list[int]:
    return random.Random(k).sample(range(100, 40000), n)


# ---------------------------------------------------------------------------- HTTP helpers


@dataclass
class Streamed:
    status: int
    worker: str = ""
    chunks: list[str] = field(default_factory=list)
    finishes: list[str] = field(default_factory=list)
    usage: dict[str, int] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(self.chunks)


def body(prompt: list[int], seed: int, max_tokens: int) -> dict[str, Any]:
    return {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "seed": seed,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def stream(
    url: str, req: dict[str, Any], headers: dict[str, str] | None = None, on_chunk: Any = None
) -> Streamed:
    """POST a streaming completion; `on_chunk(out)` runs after each text chunk."""
    async with aiohttp.ClientSession() as http, http.post(url + "/v1/completions", json=req, headers=headers) as r:
        out = Streamed(r.status, r.headers.get("x-worker-instance-id", ""))
        if r.status != 200:
            out.errors.append(await r.json())
            return out
        async for raw in r.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: ") :])
            if "error" in event:
                out.errors.append(event["error"])
            for choice in event.get("choices", []):
                if choice.get("text"):
                    out.chunks.append(choice["text"])
                    if on_chunk is not None:
                        on_chunk(out)
                if choice.get("finish_reason"):
                    out.finishes.append(choice["finish_reason"])
            out.usage = event.get("usage") or out.usage
    return out


def assert_exact(out: Streamed, prompt: list[int], seed: int, max_tokens: int) -> None:
    """The seeded stream, whole and once: text, token count, one finish."""
    assert out.status == 200 and out.errors == [], out.errors
    want = expected_text(prompt, seed, max_tokens)
    if out.text != want:
        k = next(
            (i for i, (a, b) in enumerate(zip(out.text, want, strict=False)) if a != b), min(len(out.text), len(want))
        )
        raise AssertionError(
            f"stream leaves the seeded one at char {k}: {out.text[k : k + 40]!r} != {want[k : k + 40]!r}"
        )
    counts = {k: out.usage.get(k) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
    assert counts == {"prompt_tokens": len(prompt), "completion_tokens": max_tokens,
                      "total_tokens": len(prompt) + max_tokens}  # fmt: skip
    assert out.finishes == ["length"]


async def get_json(url: str) -> tuple[int, dict[str, Any]]:
    try:
        async with aiohttp.ClientSession() as http, http.get(url, timeout=aiohttp.ClientTimeout(total=3)) as r:
            return r.status, await r.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return 0, {}


async def health_workers(url: str) -> list[dict[str, Any]]:
    return list((await get_json(url + "/health"))[1].get("workers", []))


async def until(cond: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not await cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def metric(url: str, name: str) -> float:
    async with aiohttp.ClientSession() as http, http.get(url + "/metrics") as r:
        text = await r.text()
    return sum(float(m[1]) for m in re.finditer(rf"^{name}(?:\{{[^}}]*\}})? (\S+)$", text, re.M))


# ---------------------------------------------------------------------------- processes


@dataclass
class Procs:
    logs: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, name: str, kind: str, *args: str, prefix: list[str] | None = None) -> subprocess.Popen[bytes]:
        proc = start_process(lightspeed_cmd(kind, *args), self.logs / f"{name}.log", prefix)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            stop_process(proc, signal.SIGKILL)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    made = Procs(tmp_path)
    try:
        yield made
    finally:
        made.stop()


async def frontend(procs: Procs, flags: list[str], workers: int, *extra: str, host: str = "127.0.0.1") -> str:
    port = free_port()
    procs.start("frontend", "frontend", "--host", host, "--port", str(port), *flags, *extra)
    url = f"http://{host}:{port}"
    await until(lambda: _healthy(url, workers), f"{workers} healthy workers", 60)
    return url


async def _healthy(url: str, n: int) -> bool:
    workers = await health_workers(url)
    return len(workers) == n and all(w["healthy"] for w in workers)


# ---------------------------------------------------------------------------- SIGKILL + migration


async def test_worker_sigkill_mid_stream_on_etcd_and_nats_gives_one_exact_stream(
    etcd_server: EtcdServer,  # noqa: F811
    nats_server: NatsServer,  # noqa: F811
    procs: Procs,
) -> None:
    flags = [*cluster_flags(etcd_server.url, nats_server.url, "faults"), "--cluster-secret", SECRET]
    for i in range(2):
        procs.start(f"worker{i}", "worker", *MOCKER, "--speedup-ratio", "1", *flags)
    url = await frontend(procs, flags, 2, "--router-mode", "kv", "--migration-limit", "3")
    pids = {w["instance_id"]: w["pid"] for w in await health_workers(url)}
    prompt, seed, max_tokens = prompt_of(1), 4242, 300
    killed: list[int] = []

    def kill_after_20(out: Streamed) -> None:
        if len(out.chunks) == 20:
            killed.append(pids[out.worker])
            os.kill(pids[out.worker], signal.SIGKILL)

    out = await stream(url, body(prompt, seed, max_tokens), on_chunk=kill_after_20)
    assert len(killed) == 1
    assert_exact(out, prompt, seed, max_tokens)
    assert await metric(url, "lightspeed_frontend_migrations_total") == 1.0
    # The dead worker leaves etcd with its lease; the next seeded request is exact on the survivor.
    await until(lambda: _healthy(url, 1), "the killed worker's lease to expire", 15)
    again = await stream(url, body(prompt_of(2), 7, 40))
    assert_exact(again, prompt_of(2), 7, 40)
    assert again.worker != out.worker and pids[again.worker] != killed[0]


# ---------------------------------------------------------------------------- a firewalled worker

IP = find_binary("ip") or "ip"


def run_ip(*args: str) -> None:
    subprocess.run([IP, *args], check=True, capture_output=True, timeout=10)


@dataclass(frozen=True)
class Link:
    """A network namespace joined to the test's namespace by a veth pair (a /30)."""

    ns: str
    outside: str  # address on our side
    inside: str  # address in the namespace

    @property
    def prefix(self) -> list[str]:
        return [IP, "netns", "exec", self.ns]

    def iptables(self, *args: str) -> None:
        subprocess.run([*self.prefix, "iptables", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def link() -> Iterator[Link]:
    if find_binary("ip") is None or find_binary("iptables") is None:
        pytest.skip("needs `ip` (iproute2) and `iptables` (apt-get install iproute2 iptables)")
    tag = f"{os.getpid() % 100000:05d}"
    net = f"10.79.{os.getpid() % 250}"
    made = Link(f"lsfw{tag}", f"{net}.1", f"{net}.2")
    try:
        try:
            run_ip("netns", "add", made.ns)
            run_ip("link", "add", f"lsf{tag}a", "type", "veth", "peer", "name", f"lsf{tag}b")
            run_ip("link", "set", f"lsf{tag}b", "netns", made.ns)
            run_ip("addr", "add", f"{made.outside}/30", "dev", f"lsf{tag}a")
            run_ip("link", "set", f"lsf{tag}a", "up")
            run_ip("-n", made.ns, "addr", "add", f"{made.inside}/30", "dev", f"lsf{tag}b")
            run_ip("-n", made.ns, "link", "set", f"lsf{tag}b", "up")
            run_ip("-n", made.ns, "link", "set", "lo", "up")
            made.iptables("-L", "INPUT")
        except subprocess.CalledProcessError as err:
            if any(w in err.stderr for w in (b"not permitted", b"Permission denied", b"can't initialize")):
                pytest.skip(f"network namespaces / iptables are not permitted here: {err.stderr.decode().strip()}")
            raise
        yield made
    finally:  # deleting the namespace deletes both veth ends
        subprocess.run([IP, "netns", "del", made.ns], capture_output=True, timeout=10)


async def timed(url: str, k: int) -> tuple[float, Streamed]:
    start = time.monotonic()
    try:  # a hang is the failure this guards against: fail it, do not wait for it
        out = await asyncio.wait_for(stream(url, body(prompt_of(100 + k), 900 + k, 8)), 30)
    except TimeoutError:
        raise AssertionError(f"request {k} hung for 30 s") from None
    assert_exact(out, prompt_of(100 + k), 900 + k, 8)
    return time.monotonic() - start, out


@pytest.mark.parametrize(
    "connected",
    [
        pytest.param(False, id="dial"),
        # The frontend already holds a connection: requests written to it go unacknowledged
        # until the kernel's TCP_USER_TIMEOUT (request_plane.PEER_TIMEOUT_S, 10 s) aborts it
        # (before that fix they hung for good); --migration-limit re-sends them elsewhere.
        pytest.param(True, id="open-connection", marks=pytest.mark.slow),
    ],
)
async def test_a_firewalled_worker_times_out_is_marked_unhealthy_and_the_other_serves(
    link: Link, procs: Procs, tmp_path: Path, connected: bool
) -> None:
    require_binary("etcd", "etcd-server")
    require_binary("nats-server", "nats-server")
    etcd, nats = EtcdServer(tmp_path / "etcd", link.outside), NatsServer(tmp_path / "nats", link.outside)
    try:
        etcd.start()
        nats.start()
        flags = [*cluster_flags(etcd.url, nats.url, "firewall"), "--cluster-secret", SECRET]
        args = [*MOCKER, "--speedup-ratio", "50", *flags]
        procs.start("near", "worker", *args)
        behind = procs.start("behind", "worker", *args, "--worker-host", link.inside, prefix=link.prefix)
        url = await frontend(procs, flags, 2, "--router-mode", "round-robin", "--migration-limit", "3")
        by_host = {w["address"].rsplit(":", 1)[0]: w for w in await health_workers(url)}
        near, target = by_host["127.0.0.1"]["instance_id"], by_host[link.inside]
        if connected:  # round-robin: both workers serve one, so both connections are open
            assert {(await timed(url, k))[1].worker for k in range(10, 12)} == {near, target["instance_id"]}
        link.iptables("-A", "INPUT", "-p", "tcp", "--dport", target["address"].rsplit(":", 1)[1], "-j", "DROP")

        # Round-robin sends one of the next two to the firewalled worker: its dial gets no answer
        # and times out (the request plane's 5 s connect timeout), or its open connection is
        # aborted by the kernel; the request is then served by the other worker. Every request
        # is exact; none hangs.
        times = [await timed(url, k) for k in range(4)]
        slow = [t for t, _ in times if t > 3.0]
        low, high = (9.0, 20.0) if connected else (4.5, 15.0)
        assert len(slow) == 1 and low < slow[0] < high, times
        assert {out.worker for _, out in times} == {near}
        workers = {w["instance_id"]: w["healthy"] for w in await health_workers(url)}
        assert workers == {near: True, target["instance_id"]: False}
        assert (await get_json(url + "/health"))[1]["status"] == "degraded"
        assert behind.poll() is None  # firewalled, not dead
    finally:
        etcd.kill()
        nats.kill()


# ---------------------------------------------------------------------------- hostile bytes


def listening_ports(pid: int) -> list[int]:
    """TCP ports `pid` listens on (ss -ltnp)."""
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True, timeout=10).stdout
    return sorted({int(m[1]) for line in out.splitlines() if f"pid={pid}," in line
                   for m in [re.search(r":(\d+)\s", line)] if m})  # fmt: skip


def _zmtp_huge_frame() -> bytes:
    """A ZMTP 3.0 greeting (NULL mechanism), then a frame header announcing 4 GiB (long frame)."""
    greeting = b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\x00") + b"\x00" + b"\x00" * 31
    return greeting + b"\x02" + (4 << 30).to_bytes(8, "big") + b"\x00" * 4096


HOSTILE = {
    "garbage": random.Random(5).randbytes(64 * 1024),
    "4 GB prefix (4 bytes)": b"\xff\xff\xff\xff" + b"\x00" * 4096,
    "4 GB prefix (8 bytes)": (4 << 30).to_bytes(8, "big") + b"\x00" * 4096,
    "ZMTP 4 GB frame": _zmtp_huge_frame(),
}


def attack(port: int, payload: bytes) -> None:
    """Send `payload`, read what comes back for up to a second, close."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        try:
            s.sendall(payload)
            s.settimeout(1.0)
            while s.recv(65536):
                pass
        except (TimeoutError, ConnectionError):
            pass  # silence or a reset: both are a refusal


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise AssertionError(f"no VmRSS for {pid}")


async def assert_survives_hostile_bytes(url: str, procs: list[subprocess.Popen[bytes]]) -> dict[int, list[int]]:
    """Every payload to every port of every process; each is still running and small after."""
    ports = {p.pid: listening_ports(p.pid) for p in procs}
    before = {p.pid: rss_mb(p.pid) for p in procs}
    for pid_ports in ports.values():
        for port in pid_ports:
            for payload in HOSTILE.values():
                await asyncio.to_thread(attack, port, payload)
    await asyncio.sleep(0.5)
    for p in procs:
        assert p.poll() is None, f"pid {p.pid} died of hostile bytes"
        assert rss_mb(p.pid) < before[p.pid] + 100, f"pid {p.pid} grew from {before[p.pid]:.0f} MB"
    return ports


async def test_hostile_bytes_on_every_internal_port_leave_every_process_serving(procs: Procs, tmp_path: Path) -> None:
    """File discovery + the ZMQ event plane (the embedded layout): each worker binds a request
    plane, a ZMQ publisher and a health port; the KV router's frontend binds HTTP and its
    replica-sync publisher."""
    flags = ["--discovery-path", str(tmp_path / "disc"), "--event-plane", "zmq", "--cluster-secret", SECRET]
    probes = [free_port(), free_port()]
    workers = [
        procs.start(f"worker{i}", "worker", *MOCKER, "--speedup-ratio", "50", "--health-port", str(probes[i]), *flags)
        for i in range(2)
    ]
    url = await frontend(procs, flags, 2, "--router-mode", "kv")
    ports = await assert_survives_hostile_bytes(url, procs.procs)
    # Request plane, event publisher, health port per worker; HTTP and replica sync on the frontend.
    assert all(len(ports[w.pid]) == 3 and probes[i] in ports[w.pid] for i, w in enumerate(workers)), ports
    assert len(ports[procs.procs[-1].pid]) >= 2, ports

    await until(lambda: _healthy(url, 2), "both workers healthy")
    for port in probes:
        assert (await get_json(f"http://127.0.0.1:{port}/live"))[0] == 200
        assert (await get_json(f"http://127.0.0.1:{port}/health"))[0] == 200
    # Each worker still serves exact streams, and its KV events still reach the router over ZMQ.
    indexed = await metric(url, "lightspeed_router_indexed_blocks")
    for k, w in enumerate(await health_workers(url)):
        prompt = prompt_of(300 + k)
        out = await stream(url, body(prompt, 31 + k, 16), headers={"x-worker-instance-id": w["instance_id"]})
        assert out.worker == w["instance_id"]
        assert_exact(out, prompt, 31 + k, 16)
    await until(lambda: _grew(url, indexed + 2 * 4), "KV events of the new prompts", 10)


async def _grew(url: str, at_least: float) -> bool:
    return await metric(url, "lightspeed_router_indexed_blocks") >= at_least


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def disagg_remote(server: Server) -> float:
    m = re.search(r'^lightspeed_frontend_disagg_decisions_total\{reason="remote"\} (\S+)$', server.metrics(), re.M)
    return float(m[1]) if m else 0.0


async def greedy(server: Server, k: int) -> str:
    req = {"model": MODEL, "prompt": prompt_of(500 + k, 300), "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    async with aiohttp.ClientSession() as http, http.post(server.base_url + "/completions", json=req) as r:
        assert r.status == 200, await r.text()
        out = await r.json()
    assert out["usage"]["completion_tokens"] == 12
    return str(out["choices"][0]["text"])


@pytest.mark.slow
@pytest.mark.native
async def test_hostile_bytes_on_the_kv_transfer_server_of_a_native_prefill_worker(tmp_path: Path) -> None:
    """`serve --disagg 1P1D` on the native engine: the prefill worker also listens with its KV
    transfer server (disagg/transfer_server.py). After hostile bytes on every port of every
    child, the same processes serve on: a repeated greedy request returns the same text and a
    new one is disaggregated (its KV pulled over the transfer server)."""
    args = [*NATIVE_ARGS, "--disagg", "1P1D", "--router-mode", "kv", "--cluster-secret", SECRET]
    server = start_serve([*args, "--discovery-path", str(tmp_path / "disc")], workers=2, timeout=300)
    try:
        before = await greedy(server, 0)
        remote = disagg_remote(server)
        assert remote >= 1.0  # the reference went through the transfer server too
        pids = children(server.proc.pid)
        procs = [_Attached(pid) for pid in pids]
        ports = await assert_survives_hostile_bytes(server.url, procs)  # type: ignore[arg-type]
        prefill = next(w["pid"] for w in server.health()["workers"] if w["role"] == "prefill")
        assert len(ports[prefill]) >= 3, ports  # request plane, event publisher, KV transfer server
        assert await greedy(server, 0) == before  # now a prefix hit on the decode worker
        await greedy(server, 1)  # a new prompt: prefilled remotely, its KV pulled over the server
        assert disagg_remote(server) == remote + 1
        assert {w["pid"] for w in server.health()["workers"]} <= set(pids)  # the same processes
    finally:
        assert stop_serve(server) == 0


class _Attached:
    """A child of `serve` seen as a Popen: a pid and whether it still runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def poll(self) -> int | None:
        return None if Path(f"/proc/{self.pid}").exists() and _state(self.pid) != "Z" else 1


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
