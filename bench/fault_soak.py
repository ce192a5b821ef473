"""Fault soak: a fixed open-loop request rate over 4 mocker workers on a real etcd + NATS
(JetStream) while workers are SIGKILLed and restarted, NATS restarts and etcd restarts; every
stream is checked token by token against the mocker's seeded stream.

Layout (all on 127.0.0.1, each its own process): etcd, nats-server -js, `--workers` mocker
workers (`lightspeed worker --discovery etcd --event-plane nats`), one `lightspeed frontend
--router-mode kv --migration-limit 3`. The client sends request i at t = i / rate (open loop: a
slow answer never delays the next send), each with `seed` = i, `ignore_eos` and `max_tokens` =
osl, so the mocker's tokens are fixed by (seed, position) on whatever worker serves them, before
or after a migration (mocker/executor.py `_sample_seeded`).

Faults (the `faults` run): every `--kill-every-s` one worker (in turn) is SIGKILLed mid-load and
a new one started at once; NATS is SIGKILLed and restarted (same store) at `--nats-restart-at`
x duration and etcd (same data dir) at `--etcd-restart-at` x duration. The `fault_free` run is the
same load on a fresh fleet with no faults. Both runs report requests sent / completed / failed,
streams whose text or token count differs from the seeded stream (a duplicated or lost token
changes one or the other), TTFT p50/p99 (all requests, and those sent within
`--near-fault-s` after a fault), and the RSS of every process when first and last sampled.

Rate: `--load-fraction` x the fleet's modelled capacity (see `modelled_capacity`), unless
`--rate` is given.

Run from the repo root (the committed result is the full 10 minutes per run):
    flock /tmp/lightspeed-bench.lock .venv/bin/python bench/fault_soak.py
    flock /tmp/lightspeed-bench.lock .venv/bin/python bench/fault_soak.py --duration-s 60 --out bench/.work/
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import random
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import msgspec
from harness import RESULTS, Script, main, rss_mb

from lightspeed.engine.config import EngineConfig
from lightspeed.engine.types import ScheduledSeq, SchedulerOutput
from lightspeed.frontend.detokenize import IncrementalDetokenizer
from lightspeed.mocker.executor import MockerExecutor
from lightspeed.models.registry import resolve_model
from lightspeed.protocol import PerfModel, SamplingOptions
from tests.integration.cluster_servers import (
    EtcdServer,
    NatsServer,
    cluster_flags,
    find_binary,
    free_port,
    lightspeed_cmd,
    start_process,
)

logger = logging.getLogger("fault_soak")

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
SECRET = "fault-soak-cluster-secret-0123456789"
PREFIXES = 8  # prompts share one of these many 64-token prefixes, so the KV router has work
PREFIX_LEN = 64
SETTLE_S = 4.0


@dataclass(frozen=True, slots=True)
class Params:
    duration_s: float = 600.0  # of each run (the load; faults happen within it)
    runs: str = "faults,fault_free"  # which runs, in order
    workers: int = 4
    isl: int = 128
    osl: int = 32
    speedup_ratio: float = 0.1  # mocker: 10x slower than the fitted GPU, so 2 CPU cores keep up
    block_size: int = 16
    num_gpu_blocks: int = 1024
    max_num_seqs: int = 8
    load_fraction: float = 0.7  # of the modelled capacity
    rate: float = 0.0  # req/s; 0 = load_fraction x capacity
    migration_limit: int = 3
    kill_every_s: float = 30.0
    nats_restart_at: float = 0.375  # x duration (225 s of 600: halfway between two kills)
    etcd_restart_at: float = 0.725  # x duration (435 s of 600)
    discovery_ttl: float = 2.0
    near_fault_s: float = 5.0  # a request sent this long after a fault counts as "near a fault"
    request_timeout_s: float = 120.0  # a stream still open after this is a failure (a hang)
    rss_interval_s: float = 5.0
    seed: int = 0
    # The `netns` run: each worker on its own "host" (a network namespace on a bridge with
    # etcd, NATS, the frontend and the client), one worker's link cut for cut_s at cut_at.
    netns_duration_s: float = 120.0
    cut_at: float = 0.25  # x netns_duration_s
    cut_s: float = 30.0

    def __post_init__(self) -> None:
        if self.duration_s <= 0 or self.kill_every_s <= 0 or self.request_timeout_s <= 0:
            raise ValueError("duration_s, kill_every_s and request_timeout_s must be > 0")
        if self.workers < 2:
            raise ValueError("workers must be >= 2 (one is always being restarted)")
        if self.isl <= PREFIX_LEN or self.osl < 1:
            raise ValueError(f"isl must be > {PREFIX_LEN} (the shared prefix) and osl >= 1")
        if not 0 < self.load_fraction <= 1.5 or self.rate < 0:
            raise ValueError("load_fraction must be in (0, 1.5] and rate >= 0")
        unknown = set(self.run_names) - {"faults", "fault_free", "netns"}
        if unknown or not self.run_names:
            raise ValueError(f"runs: a comma-separated list of faults, fault_free, netns; got {self.runs!r}")
        if self.netns_duration_s <= 0 or not 0 < self.cut_at < 1 or self.cut_s <= 0:
            raise ValueError("netns_duration_s and cut_s must be > 0, cut_at in (0, 1)")
        if not 0 < self.nats_restart_at < 1 or not 0 < self.etcd_restart_at < 1:
            raise ValueError("nats_restart_at and etcd_restart_at are fractions of the duration in (0, 1)")

    @property
    def run_names(self) -> list[str]:
        return [r.strip() for r in self.runs.split(",") if r.strip()]

    def duration_of(self, run: str) -> float:
        return self.netns_duration_s if run == "netns" else self.duration_s


# ---------------------------------------------------------------------------- capacity


class Capacity(msgspec.Struct):
    per_worker_req_s: float
    fleet_req_s: float
    rate_req_s: float  # what the runs send
    prefill_ms: float  # one ISL prefill phase (wall, speedup included)
    decode_ms: float  # one decode step at a full batch (wall)
    kv_usage_full_batch: float
    how: str


def modelled_capacity(p: Params) -> Capacity:
    """Requests/s a worker sustains with a full batch of max_num_seqs, from the mocker's own
    step-time model (PerfModel.dynamo_default, speedup included). Each request costs one
    prefill phase of ISL tokens and OSL decode steps shared with max_num_seqs - 1 others, at the
    KV usage of a full batch: 1 s = rate x (prefill + OSL x decode / max_num_seqs)."""
    perf = PerfModel.dynamo_default(p.speedup_ratio)
    blocks_per_req = math.ceil((p.isl + p.osl) / p.block_size)
    usage = min(1.0, p.max_num_seqs * blocks_per_req / p.num_gpu_blocks)
    prefill_s = perf.wall_seconds(perf.prefill_ms(p.isl))
    decode_s = perf.wall_seconds(perf.decode_ms(usage))
    per_worker = 1.0 / (prefill_s + p.osl * decode_s / p.max_num_seqs)
    fleet = per_worker * p.workers
    rate = p.rate or p.load_fraction * fleet
    how = (
        f"per worker = 1 / (prefill({p.isl}) + {p.osl} x decode(usage) / {p.max_num_seqs}); usage = "
        f"{p.max_num_seqs} seqs x {blocks_per_req} blocks / {p.num_gpu_blocks}; times from "
        f"PerfModel.dynamo_default({p.speedup_ratio}) (what the mocker sleeps by); fleet = {p.workers} x per worker"
    )
    return Capacity(per_worker, fleet, rate, prefill_s * 1e3, decode_s * 1e3, usage, how)


# ---------------------------------------------------------------------------- seeded streams


class SeededStreams:
    """The text a mocker worker streams for a seeded request, computed here: the token at
    position k of the output is `MockerExecutor.sample` at position len(prompt) + k, decoded by
    the frontend's own incremental detokenizer."""

    def __init__(self, model: str = MODEL) -> None:
        resolved = resolve_model(model)
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(resolved.folder / "tokenizer.json"))
        self._sampler = MockerExecutor(
            EngineConfig(), vocab_size=resolved.vocab_size, avoid_token_ids=set(resolved.eos_token_ids)
        )

    def token_ids(self, prompt_len: int, seed: int, n: int) -> list[int]:
        options = SamplingOptions(seed=seed)
        out = []
        for k in range(n):
            position = prompt_len + k  # the sampler's position: start_pos + len(token_ids)
            seq = ScheduledSeq("x", [0], position - 1, [0], True, options, is_prefill=False)
            out.append(self._sampler.sample(SchedulerOutput([seq]))["x"])
        return out

    def text(self, prompt_len: int, seed: int, n: int) -> str:
        detok = IncrementalDetokenizer(self.tokenizer)
        detok.add(self.token_ids(prompt_len, seed, n))
        detok.flush()
        return detok.output_text


def prompt_of(i: int, isl: int, seed: int) -> list[int]:
    """A shared 64-token prefix (one of PREFIXES) and a suffix unique to request i."""
    prefix = random.Random(seed * 1000 + i % PREFIXES).sample(range(100, 40000), PREFIX_LEN)
    rng = random.Random(seed * 1_000_003 + i + 1)
    return prefix + [rng.randrange(100, 40000) for _ in range(isl - PREFIX_LEN)]


# ---------------------------------------------------------------------------- the client


class Outcome(msgspec.Struct):
    index: int
    sent_s: float  # since the load started
    ttft_s: float | None = None
    end_s: float | None = None
    status: int = 0
    chunks: list[str] = msgspec.field(default_factory=list)
    completion_tokens: int | None = None
    finish_reason: str | None = None
    worker: str = ""
    error: str = ""

    @property
    def text(self) -> str:
        return "".join(self.chunks)


async def _read_stream(resp: aiohttp.ClientResponse, out: Outcome, t0: float) -> None:
    async for raw in resp.content:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[len("data: ") :])
        if "error" in event:
            out.error = f"in-band error: {event['error']}"
            return
        for choice in event.get("choices", []):
            if choice.get("text"):
                if out.ttft_s is None:
                    out.ttft_s = time.monotonic() - t0 - out.sent_s
                out.chunks.append(choice["text"])
            out.finish_reason = choice.get("finish_reason") or out.finish_reason
        if event.get("usage"):
            out.completion_tokens = event["usage"]["completion_tokens"]


async def send_one(http: aiohttp.ClientSession, url: str, p: Params, i: int, t0: float) -> Outcome:
    out = Outcome(i, time.monotonic() - t0)
    body = {
        "model": MODEL,
        "prompt": prompt_of(i, p.isl, p.seed),
        "max_tokens": p.osl,
        "ignore_eos": True,
        "seed": p.seed * 1_000_000 + i,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    try:
        async with asyncio.timeout(p.request_timeout_s), http.post(url + "/v1/completions", json=body) as resp:
            out.status = resp.status
            out.worker = resp.headers.get("x-worker-instance-id", "")
            if resp.status != 200:
                out.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
            else:
                await _read_stream(resp, out, t0)
    except TimeoutError:
        out.error = f"no end within {p.request_timeout_s:.0f} s"
    except aiohttp.ClientError as exc:
        out.error = f"{type(exc).__name__}: {exc}"
    out.end_s = time.monotonic() - t0
    return out


async def open_loop(url: str, p: Params, rate: float, t0: float, duration_s: float) -> list[Outcome]:
    """Request i leaves at t0 + i / rate whatever happened to the earlier ones."""
    conn = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as http:
        tasks = []
        n = int(duration_s * rate)
        for i in range(n):
            delay = t0 + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(send_one(http, url, p, i, t0)))
        return list(await asyncio.gather(*tasks))


# ---------------------------------------------------------------------------- the fleet


@dataclass
class Proc:
    role: str  # etcd, nats, frontend, worker0..N
    proc: subprocess.Popen[bytes]
    rss_first_mb: float | None = None
    rss_last_mb: float | None = None
    rss_max_mb: float = 0.0
    started_s: float = 0.0
    ended_s: float | None = None  # killed (or the run ended) at, since the load started
    spawned: float = field(default_factory=time.monotonic)

    def sample(self) -> None:
        if self.proc.poll() is not None:
            return
        with contextlib.suppress(OSError, RuntimeError):
            mb = rss_mb(self.proc.pid)
            # A process started during the run is still importing for a few seconds: its start
            # RSS is its first sample once it has been up SETTLE_S (it has registered by then).
            settled = time.monotonic() - self.spawned >= SETTLE_S
            if self.rss_first_mb is None and settled:
                self.rss_first_mb = mb
            self.rss_last_mb = mb
            self.rss_max_mb = max(self.rss_max_mb, mb)


@dataclass
class Fleet:
    p: Params
    workdir: Path
    etcd: EtcdServer
    nats: NatsServer
    url: str = ""
    procs: list[Proc] = field(default_factory=list)
    t0: float = 0.0
    watchers: list[asyncio.Task[None]] = field(default_factory=list)  # recovery timers of faults
    hosts: Hosts | None = None  # the netns run: worker i runs in hosts.names[i]

    @property
    def flags(self) -> list[str]:
        ttl = self.p.discovery_ttl
        return [*cluster_flags(self.etcd.url, self.nats.url, "soak", ttl=ttl), "--cluster-secret", SECRET]

    def now(self) -> float:
        return time.monotonic() - self.t0 if self.t0 else 0.0

    def add(self, role: str, proc: subprocess.Popen[bytes]) -> Proc:
        entry = Proc(role, proc, started_s=self.now())
        self.procs.append(entry)
        return entry

    def start_worker(self, slot: int) -> Proc:
        p = self.p
        args = ["--engine", "mocker", "--block-size", str(p.block_size), "--num-gpu-blocks", str(p.num_gpu_blocks)]
        args += ["--max-num-seqs", str(p.max_num_seqs), "--speedup-ratio", str(p.speedup_ratio)]
        prefix: list[str] = []
        if self.hosts is not None:
            args += ["--worker-host", self.hosts.worker_address(slot)]
            prefix = self.hosts.prefix(slot)
        cmd = lightspeed_cmd("worker", *args, *self.flags, "--log-level", "WARNING")
        return self.add(f"worker{slot}", start_process(cmd, self.workdir / f"worker{slot}.log", prefix))

    def start_frontend(self) -> None:
        port = free_port()
        args = ["--port", str(port), "--router-mode", "kv", "--migration-limit", str(self.p.migration_limit)]
        cmd = lightspeed_cmd("frontend", *args, *self.flags, "--log-level", "WARNING")
        self.add("frontend", start_process(cmd, self.workdir / "frontend.log"))
        self.url = f"http://127.0.0.1:{port}"

    def live(self, role: str) -> Proc:
        return next(e for e in self.procs if e.role == role and e.proc.poll() is None and e.ended_s is None)

    def kill(self, entry: Proc) -> None:
        entry.sample()
        entry.ended_s = self.now()
        if entry.proc.poll() is None:
            entry.proc.send_signal(signal.SIGKILL)
            entry.proc.wait(10)

    def server_procs(self) -> None:
        """Track the etcd / NATS processes (new ones after each restart)."""
        for role, server in (("etcd", self.etcd), ("nats", self.nats)):
            known = [e for e in self.procs if e.role == role and e.proc is server.proc]
            if not known and server.proc is not None:
                self.add(role, server.proc)

    def sample_all(self) -> None:
        self.server_procs()
        for entry in self.procs:
            entry.sample()

    def stop(self) -> None:
        for task in self.watchers:
            task.cancel()
        for entry in self.procs:
            if entry.ended_s is None:
                entry.sample()
                entry.ended_s = self.now()
            if entry.proc.poll() is None:
                entry.proc.send_signal(signal.SIGKILL)
                entry.proc.wait(10)


async def health(url: str) -> dict[str, object]:
    try:
        async with aiohttp.ClientSession() as http, http.get(url + "/health", timeout=aiohttp.ClientTimeout(2)) as r:
            body: dict[str, object] = await r.json()
            return body
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return {}


async def healthy_pids(url: str) -> list[int]:
    """Pids of the workers the frontend lists, if it lists each healthy (else [])."""
    workers = (await health(url)).get("workers", [])
    if not isinstance(workers, list) or not all(isinstance(w, dict) and w.get("healthy") for w in workers):
        return []
    return sorted(int(w["pid"]) for w in workers)


async def wait_until(cond: Callable[[], object], what: str, timeout: float = 60.0) -> float:
    """Seconds until the async `cond()` holds."""
    start = time.monotonic()
    while not await cond():  # type: ignore[misc]
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)
    return time.monotonic() - start


async def start_fleet(p: Params, workdir: Path, hosts: Hosts | None = None) -> Fleet:
    for name, pkg in (("etcd", "etcd-server"), ("nats-server", "nats-server")):
        if find_binary(name) is None:
            raise RuntimeError(f"{name} is not installed (apt-get install {pkg})")
    host = hosts.bridge_address if hosts is not None else "127.0.0.1"
    fleet = Fleet(p, workdir, EtcdServer(workdir / "etcd", host), NatsServer(workdir / "nats", host), hosts=hosts)
    await asyncio.to_thread(fleet.etcd.start)
    await asyncio.to_thread(fleet.nats.start)
    fleet.server_procs()
    for slot in range(p.workers):
        fleet.start_worker(slot)
    fleet.start_frontend()
    await wait_until(lambda: _serves_live_workers(fleet), f"{p.workers} healthy workers", timeout=120)
    return fleet


async def _serves_live_workers(fleet: Fleet) -> bool:
    """The frontend lists exactly the running worker processes, each healthy."""
    live = sorted(e.proc.pid for e in fleet.procs if e.role.startswith("worker") and e.proc.poll() is None)
    return await healthy_pids(fleet.url) == live


# ---------------------------------------------------------------------------- faults


class FaultEvent(msgspec.Struct):
    at_s: float  # since the load started
    what: str
    recovered_s: float | None = None  # until the frontend listed every worker healthy again


async def inject_faults(fleet: Fleet, p: Params, events: list[FaultEvent]) -> None:
    """Kills every kill_every_s (workers in turn) and the two server restarts, in time order."""
    plan: list[tuple[float, str]] = [(k * p.kill_every_s, "kill") for k in range(1, int(p.duration_s / p.kill_every_s))]
    plan += [(p.nats_restart_at * p.duration_s, "nats"), (p.etcd_restart_at * p.duration_s, "etcd")]
    plan.sort()
    slot = 0
    for at, kind in plan:
        await asyncio.sleep(max(0.0, at - fleet.now()))
        if kind == "kill":
            victim = fleet.live(f"worker{slot}")
            fleet.kill(victim)
            fleet.start_worker(slot)
            event = FaultEvent(fleet.now(), f"SIGKILL worker{slot} (pid {victim.proc.pid}), new one started")
            slot = (slot + 1) % p.workers
        else:
            server = fleet.nats if kind == "nats" else fleet.etcd
            fleet.sample_all()
            next(e for e in fleet.procs if e.proc is server.proc).ended_s = fleet.now()
            event = FaultEvent(fleet.now(), f"{kind} SIGKILLed and restarted (same data)")
            await asyncio.to_thread(server.restart)
            fleet.server_procs()
        events.append(event)
        logger.info("t=%.1f s: %s", event.at_s, event.what)
        fleet.watchers.append(asyncio.create_task(_note_recovery(fleet, event)))


async def _note_recovery(fleet: Fleet, event: FaultEvent) -> None:
    with contextlib.suppress(RuntimeError):
        await wait_until(lambda: _serves_live_workers(fleet), "recovery", timeout=120)
        event.recovered_s = round(fleet.now() - event.at_s, 2)


async def sample_rss(fleet: Fleet, interval_s: float) -> None:
    while True:
        fleet.sample_all()
        await asyncio.sleep(interval_s)


# ---------------------------------------------------------------------------- the netns run

IP = find_binary("ip") or "ip"
SUBNET = "10.80.0"


def ip(*args: str) -> None:
    subprocess.run([IP, *args], check=True, capture_output=True, timeout=10)


@dataclass
class Hosts:
    """One network namespace per worker ("host"), each joined by a veth pair to a bridge in
    this namespace, where etcd, NATS, the frontend and the client run (bridge address .1)."""

    workers: int
    tag: str = field(default_factory=lambda: f"{os.getpid() % 100000:05d}")

    @property
    def bridge(self) -> str:
        return f"lsb{self.tag}"

    @property
    def bridge_address(self) -> str:
        return f"{SUBNET}.1"

    @property
    def names(self) -> list[str]:
        return [f"lss{self.tag}-{i}" for i in range(self.workers)]

    def worker_address(self, i: int) -> str:
        return f"{SUBNET}.{i + 2}"

    def link(self, i: int) -> str:
        """This side of worker i's veth: setting it down cuts that host off."""
        return f"lsv{self.tag}o{i}"

    def prefix(self, i: int) -> list[str]:
        return [IP, "netns", "exec", self.names[i]]

    def build(self) -> None:
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.bridge_address}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        for i, ns in enumerate(self.names):
            inside = f"lsv{self.tag}i{i}"
            ip("netns", "add", ns)
            ip("link", "add", self.link(i), "type", "veth", "peer", "name", inside)
            ip("link", "set", inside, "netns", ns)
            ip("link", "set", self.link(i), "master", self.bridge, "up")
            ip("-n", ns, "addr", "add", f"{self.worker_address(i)}/24", "dev", inside)
            ip("-n", ns, "link", "set", inside, "up")
            ip("-n", ns, "link", "set", "lo", "up")

    def remove(self) -> None:
        for ns in self.names:  # deleting a namespace deletes its veth pair
            subprocess.run([IP, "netns", "del", ns], capture_output=True, timeout=10)
        subprocess.run([IP, "link", "del", self.bridge], capture_output=True, timeout=10)


async def cut_link(fleet: Fleet, p: Params, events: list[FaultEvent]) -> None:
    """Worker 0's host loses its link at cut_at x duration and gets it back cut_s later."""
    assert fleet.hosts is not None
    await asyncio.sleep(max(0.0, p.cut_at * p.netns_duration_s - fleet.now()))
    ip("link", "set", fleet.hosts.link(0), "down")
    events.append(FaultEvent(fleet.now(), f"worker0's host link down for {p.cut_s:.0f} s"))
    logger.info("t=%.1f s: %s", events[-1].at_s, events[-1].what)
    await asyncio.sleep(p.cut_s)
    ip("link", "set", fleet.hosts.link(0), "up")
    events.append(FaultEvent(fleet.now(), "worker0's host link up again"))
    logger.info("t=%.1f s: %s", events[-1].at_s, events[-1].what)
    fleet.watchers.append(asyncio.create_task(_note_recovery(fleet, events[-1])))


# ---------------------------------------------------------------------------- checking


class Mismatch(msgspec.Struct):
    index: int
    worker: str
    completion_tokens: int | None
    expected_tokens: int
    first_diff_char: int  # where the streamed text leaves the expected one
    got_tail: str
    expected_tail: str


def first_diff(a: str, b: str) -> int:
    n = min(len(a), len(b))
    return next((k for k in range(n) if a[k] != b[k]), n)


def check(outcomes: list[Outcome], p: Params, streams: SeededStreams) -> list[Mismatch]:
    """Completed streams whose text or token count is not the seeded stream's."""
    bad = []
    for out in outcomes:
        if out.error or out.status != 200:
            continue
        want = streams.text(p.isl, p.seed * 1_000_000 + out.index, p.osl)
        if out.text == want and out.completion_tokens == p.osl and out.finish_reason == "length":
            continue
        k = first_diff(out.text, want)
        bad.append(
            Mismatch(out.index, out.worker, out.completion_tokens, p.osl, k, out.text[k : k + 40], want[k : k + 40])
        )
    return bad


# ---------------------------------------------------------------------------- one run


class Percentiles(msgspec.Struct):
    n: int
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None


def percentiles(values: list[float]) -> Percentiles:
    if not values:
        return Percentiles(0, None, None, None)
    xs = sorted(values)

    def at(q: float) -> float:
        return round(xs[min(len(xs) - 1, int(q * len(xs)))] * 1e3, 1)

    return Percentiles(len(xs), at(0.5), at(0.99), round(xs[-1] * 1e3, 1))


class ProcRss(msgspec.Struct):
    role: str
    pid: int
    started_s: float
    ended_s: float | None
    rss_start_mb: float | None
    rss_end_mb: float | None
    rss_max_mb: float


class RunReport(msgspec.Struct):
    name: str
    duration_s: float
    rate_req_s: float
    sent: int
    completed: int  # HTTP 200 and a stream that ended with a finish reason
    failed: int  # HTTP error, in-band error, transport error or no end within request_timeout_s
    token_mismatches: int  # completed, but text or token count differs from the seeded stream
    exact_streams: int
    migrations: float  # the frontend's lightspeed_frontend_migrations_total at the end
    ttft_all: Percentiles
    ttft_near_faults: Percentiles  # requests sent within near_fault_s after a fault
    ttft_away_from_faults: Percentiles
    e2e_all: Percentiles
    faults: list[FaultEvent]
    failures: list[dict[str, object]]  # the first 20
    mismatches: list[Mismatch]  # the first 20
    processes: list[ProcRss]


async def migrations_total(url: str) -> float:
    try:
        async with aiohttp.ClientSession() as http, http.get(url + "/metrics") as r:
            text = await r.text()
    except aiohttp.ClientError:
        return float("nan")
    return sum(
        float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith("lightspeed_frontend_migrations_total")
    )


async def one_run(name: str, p: Params, rate: float, streams: SeededStreams, workdir: Path) -> RunReport:
    if name != "netns":
        return await _measure(name, p, rate, streams, await start_fleet(p, workdir))
    hosts = Hosts(p.workers)
    try:
        await asyncio.to_thread(hosts.build)
        return await _measure(name, p, rate, streams, await start_fleet(p, workdir, hosts))
    finally:
        hosts.remove()


async def _measure(name: str, p: Params, rate: float, streams: SeededStreams, fleet: Fleet) -> RunReport:
    events: list[FaultEvent] = []
    duration = p.duration_of(name)
    try:
        await asyncio.sleep(SETTLE_S)
        fleet.sample_all()  # start RSS: the fleet is up and idle
        fleet.t0 = time.monotonic()
        sampler = asyncio.create_task(sample_rss(fleet, p.rss_interval_s))
        faults = {"faults": inject_faults, "netns": cut_link}.get(name)
        injector = asyncio.create_task(faults(fleet, p, events)) if faults is not None else None
        outcomes = await open_loop(fleet.url, p, rate, fleet.t0, duration)
        if injector is not None:
            injector.cancel()
        sampler.cancel()
        fleet.sample_all()
        migrations = await migrations_total(fleet.url)
    finally:
        fleet.stop()
    return report(name, duration, p, rate, outcomes, check(outcomes, p, streams), events, fleet, migrations)


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


def _near(t: float, events: list[FaultEvent], window: float) -> bool:
    return any(0 <= t - e.at_s <= window for e in events)


def report(
    name: str,
    duration: float,
    p: Params,
    rate: float,
    outcomes: list[Outcome],
    mismatches: list[Mismatch],
    events: list[FaultEvent],
    fleet: Fleet,
    migrations: float,
) -> RunReport:
    failed = [o for o in outcomes if o.error or o.status != 200]
    ok = [o for o in outcomes if not (o.error or o.status != 200)]
    ttft = [(o.sent_s, o.ttft_s) for o in ok if o.ttft_s is not None]
    near = [v for t, v in ttft if _near(t, events, p.near_fault_s)]
    away = [v for t, v in ttft if not _near(t, events, p.near_fault_s)]
    procs = [ProcRss(e.role, e.proc.pid, round(e.started_s, 1), _round(e.ended_s), e.rss_first_mb, e.rss_last_mb,
                     e.rss_max_mb) for e in fleet.procs]  # fmt: skip
    return RunReport(
        name=name,
        duration_s=duration,
        rate_req_s=round(rate, 3),
        sent=len(outcomes),
        completed=len(ok),
        failed=len(failed),
        token_mismatches=len(mismatches),
        exact_streams=len(ok) - len(mismatches),
        migrations=migrations,
        ttft_all=percentiles([v for _, v in ttft]),
        ttft_near_faults=percentiles(near),
        ttft_away_from_faults=percentiles(away),
        e2e_all=percentiles([o.end_s - o.sent_s for o in ok if o.end_s is not None]),
        faults=events,
        failures=[{"index": o.index, "sent_s": round(o.sent_s, 2), "error": o.error} for o in failed[:20]],
        mismatches=mismatches[:20],
        processes=procs,
    )


# ---------------------------------------------------------------------------- the script


class Report(msgspec.Struct):
    params: Params
    capacity: Capacity
    runs: dict[str, RunReport]
    note: str


NOTE = (
    "Token check: each completed stream's text must equal the seeded expected text (the mocker's "
    "sampler at positions len(prompt)+k, decoded with the frontend's incremental detokenizer), "
    "its usage.completion_tokens must equal max_tokens and its finish_reason must be 'length'; a "
    "duplicated or missing token breaks one of these. TTFT = time to the first non-empty text chunk. "
    "RSS = VmRSS of each process at its first and last 5 s sample (start: the idle fleet before "
    "the load; end: just before it was killed or the run ended)."
)


async def run(args: argparse.Namespace, p: Params) -> Report:
    capacity = modelled_capacity(p)
    logger.info("capacity %.2f req/s (fleet), sending %.2f req/s", capacity.fleet_req_s, capacity.rate_req_s)
    streams = SeededStreams()
    runs: dict[str, RunReport] = {}
    for name in p.run_names:
        with tempfile.TemporaryDirectory(prefix=f"ls-fault-soak-{name}-") as tmp:
            logger.info("run %s: %.0f s", name, p.duration_of(name))
            runs[name] = await one_run(name, p, capacity.rate_req_s, streams, Path(tmp))
            _log_run(runs[name])
    return Report(p, capacity, runs, NOTE)


def _log_run(r: RunReport) -> None:
    logger.info(
        "%s: sent %d, completed %d, failed %d, token mismatches %d, migrations %.0f, TTFT p50 %s / p99 %s ms",
        r.name, r.sent, r.completed, r.failed, r.token_mismatches, r.migrations, r.ttft_all.p50_ms, r.ttft_all.p99_ms,
    )  # fmt: skip


def add_flags(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--name", default="fault_soak", help="output file stem")


def result_path(args: argparse.Namespace) -> Path:
    return RESULTS / f"{args.name}.json"


def summarize(report: Report) -> None:
    for r in report.runs.values():
        _log_run(r)


SCRIPT = Script(
    name="fault_soak",
    doc=__doc__,
    params=Params,
    run=run,
    result_path=result_path,
    add_flags=add_flags,
    summarize=summarize,
)

if __name__ == "__main__":
    raise SystemExit(main(SCRIPT))
