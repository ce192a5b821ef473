"""Hostile clients beside well-behaved ones: does anyone but the attacker notice?

Starts `lightspeed serve --engine mocker` (2 workers) and runs the `lightspeed.bench` closed-loop
client (concurrency 32) twice for `--phase-s` each: once alone (clean), once while a hostile mix
runs against the same server:
  - one ~8 MB prompt per second (just under the 8 MiB body limit; tokenizing it is the work),
  - 2,000 idle TCP connections to the HTTP port that never send a byte,
  - 10 slowloris clients that send a request header one line per second, reconnecting when cut,
  - a request-plane client that announces a 200 MB frame to a worker and trickles its body.
Reports the well-behaved clients' TTFT p50/p99 and failures in both phases (target: 0 failures,
hostile p99 <= 2x clean), what the attackers got (statuses, how long the server let each
connection live), and the frontend's RSS before, during and after the attack.

Run from the repo root:
    flock /tmp/lightspeed-bench.lock .venv/bin/python bench/hostile_mix.py
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field

import aiohttp
import msgspec
from harness import (
    RESULTS,
    WORK,
    Script,
    Service,
    find_roles,
    free_port,
    lightspeed_serve,
    main,
    rss_mb,
    wait_for_model,
)

from lightspeed.bench import BenchConfig, run_bench
from lightspeed.bench.stats import BenchSummary

logger = logging.getLogger("hostile_mix")


@dataclass(frozen=True, slots=True)
class Params:
    phase_s: float = 60.0
    concurrency: int = 32
    isl: int = 64
    osl: int = 32
    workers: int = 2
    speedup_ratio: float = 1.0
    big_prompt_mb: float = 7.9
    idle_connections: int = 2000
    slowloris_clients: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if self.phase_s <= 0 or self.concurrency < 1 or self.workers < 1:
            raise ValueError("phase_s must be > 0, concurrency and workers >= 1")


class Phase(msgspec.Struct):
    completed: int
    failed: int
    failures: dict[str, int]
    req_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float


class AttackStats(msgspec.Struct):
    big_prompt_statuses: dict[str, int]  # HTTP status (or exception name) -> count
    big_prompt_p50_s: float  # time to an answer
    idle_opened: int
    idle_refused: int
    idle_still_open_at_end: int
    slowloris_connections: int  # connections opened (each cut one is reopened)
    slowloris_max_life_s: float  # the longest any one stayed open
    request_plane_connections: int
    request_plane_max_life_s: float


class Report(msgspec.Struct):
    params: Params
    server_command: str
    clean: Phase
    hostile: Phase
    ttft_p99_ratio: float  # hostile / clean
    attack: AttackStats
    frontend_rss_mb: dict[str, float]  # before / during / after (10 s after the attack stopped)
    target_met: bool


@dataclass
class Attack:
    """Counters the attackers fill in while they run."""

    stop: asyncio.Event = field(default_factory=asyncio.Event)
    big_statuses: Counter[str] = field(default_factory=Counter)
    big_latencies: list[float] = field(default_factory=list)
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = field(default_factory=list)
    idle_refused: int = 0
    loris_conns: int = 0
    loris_lives: list[float] = field(default_factory=list)
    plane_conns: int = 0
    plane_lives: list[float] = field(default_factory=list)


# ---------------------------------------------------------------- the attackers


async def big_prompts(url: str, model: str, mb: float, attack: Attack) -> None:
    """One ~`mb` MB prompt per second, each in its own task so a slow answer does not pace them."""
    body = msgspec.json.encode({"model": model, "prompt": "hello " * int(mb * 1e6 / 6), "max_tokens": 1})
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def one() -> None:
            t0 = time.monotonic()
            try:
                headers = {"Content-Type": "application/json"}
                async with session.post(url + "/v1/completions", data=body, headers=headers) as resp:
                    await resp.read()
                    attack.big_statuses[str(resp.status)] += 1
            except (aiohttp.ClientError, TimeoutError) as exc:
                attack.big_statuses[type(exc).__name__] += 1
            attack.big_latencies.append(time.monotonic() - t0)

        tasks = []
        while not attack.stop.is_set():
            tasks.append(asyncio.create_task(one()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(attack.stop.wait(), 1.0)
        await asyncio.gather(*tasks)


async def idle_connections(host: str, port: int, count: int, attack: Attack) -> None:
    for _ in range(count):
        try:
            attack.idle.append(await asyncio.open_connection(host, port))
        except OSError:
            attack.idle_refused += 1
    await attack.stop.wait()


async def _hold(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, lines: list[bytes], stop: asyncio.Event
) -> float:
    """Send `lines` one per second until the peer closes or `stop`; returns the connection's life."""
    t0 = time.monotonic()
    closed = asyncio.create_task(reader.read())
    try:
        for line in lines:
            writer.write(line)
            done, _ = await asyncio.wait(
                [closed, asyncio.create_task(stop.wait())], timeout=1.0, return_when="FIRST_COMPLETED"
            )
            if done:
                break
    except (ConnectionError, OSError):
        pass
    finally:
        closed.cancel()
        writer.close()
    return time.monotonic() - t0


async def slowloris(host: str, port: int, attack: Attack) -> None:
    header = [b"POST /v1/completions HTTP/1.1\r\n", b"Host: x\r\n"] + [b"X-Slow-%d: 1\r\n" % i for i in range(100000)]
    while not attack.stop.is_set():
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            await asyncio.sleep(1.0)
            continue
        attack.loris_conns += 1
        attack.loris_lives.append(await _hold(reader, writer, header, attack.stop))


async def request_plane_flood(address: str, attack: Attack) -> None:
    host, port = address.rsplit(":", 1)
    chunks = [(200 * 1024 * 1024).to_bytes(4, "big")] + [b"\x00" * 65536] * 100000
    while not attack.stop.is_set():
        try:
            reader, writer = await asyncio.open_connection(host, int(port))
        except OSError:
            await asyncio.sleep(1.0)
            continue
        attack.plane_conns += 1
        attack.plane_lives.append(await _hold(reader, writer, chunks, attack.stop))


# ---------------------------------------------------------------- phases


def _phase(s: BenchSummary) -> Phase:
    ttft, itl = s.ttft_s, s.itl_s
    return Phase(
        s.completed,
        s.failed,
        dict(s.failures),
        s.req_per_s,
        ttft.p50 * 1e3 if ttft else float("nan"),
        ttft.p99 * 1e3 if ttft else float("nan"),
        itl.p50 * 1e3 if itl else float("nan"),
    )


async def load_phase(url: str, p: Params, label: str) -> Phase:
    cfg = BenchConfig(
        url=url,
        concurrency=p.concurrency,
        num_requests=None,
        duration_s=p.phase_s,
        isl=p.isl,
        osl=p.osl,
        progress=False,
        seed=p.seed,
        label=label,
        timeout_s=60.0,
    )
    return _phase((await run_bench(cfg)).summary)


async def worker_address(url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(url + "/health") as resp:
        body = await resp.json()
    return str(body["workers"][0]["address"])


async def attacked_phase(url: str, model: str, p: Params, frontend_pid: int) -> tuple[Phase, Attack, float]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    attack = Attack()
    attackers = [
        asyncio.create_task(big_prompts(url, model, p.big_prompt_mb, attack)),
        asyncio.create_task(idle_connections(host, int(port), p.idle_connections, attack)),
        asyncio.create_task(request_plane_flood(await worker_address(url), attack)),
        *(asyncio.create_task(slowloris(host, int(port), attack)) for _ in range(p.slowloris_clients)),
    ]
    await asyncio.sleep(2.0)  # let the idle connections pile up before measuring
    phase = await load_phase(url, p, "hostile")
    during = rss_mb(frontend_pid)
    attack.stop.set()
    await asyncio.gather(*attackers, return_exceptions=True)
    return phase, attack, during


def _attack_stats(a: Attack) -> AttackStats:
    # The reader sees EOF once the server closed its side (e.g. after the header timeout).
    still_open = sum(1 for reader, _ in a.idle if not reader.at_eof())
    for _, writer in a.idle:
        writer.close()
    lat = sorted(a.big_latencies)
    return AttackStats(
        dict(a.big_statuses),
        lat[len(lat) // 2] if lat else float("nan"),
        len(a.idle),
        a.idle_refused,
        still_open,
        a.loris_conns,
        max(a.loris_lives, default=0.0),
        a.plane_conns,
        max(a.plane_lives, default=0.0),
    )


async def measure(svc: Service, p: Params) -> Report:
    model = await wait_for_model(svc, 120.0)
    frontend = find_roles(svc.procs[0].pid, ("frontend",))["frontend"]
    await load_phase(svc.url, Params(phase_s=3.0, concurrency=p.concurrency, isl=p.isl, osl=p.osl), "warmup")
    before = rss_mb(frontend)
    clean = await load_phase(svc.url, p, "clean")
    hostile, attack, during = await attacked_phase(svc.url, model, p, frontend)
    stats = _attack_stats(attack)
    await asyncio.sleep(10.0)  # what the attack left behind, once its sockets are closed
    rss = {"before": before, "during": during, "after": rss_mb(frontend)}
    ratio = hostile.ttft_p99_ms / clean.ttft_p99_ms
    met = hostile.failed == 0 and ratio <= 2.0
    return Report(p, "", clean, hostile, ratio, stats, rss, met)


async def run(args: argparse.Namespace, p: Params) -> Report:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="ls-hostile-") as tmp:
        serve_flags: dict[str, object] = {
            "--workers": p.workers,
            "--speedup-ratio": p.speedup_ratio,
            "--host": "127.0.0.1",
            "--port": port,
            "--discovery-path": tmp,
        }
        svc = lightspeed_serve("lightspeed-hostile", "mocker", port, serve_flags, WORK / "hostile-logs")
        try:
            svc.start()
            report = await measure(svc, p)
        finally:
            svc.stop()
    report.server_command = " ".join(svc.commands[0])
    return report


def summarize(r: Report) -> None:
    logger.info(
        "clean TTFT p50/p99 %.1f/%.1f ms, %d failed; hostile %.1f/%.1f ms, %d failed; p99 x%.2f; target %s",
        r.clean.ttft_p50_ms,
        r.clean.ttft_p99_ms,
        r.clean.failed,
        r.hostile.ttft_p50_ms,
        r.hostile.ttft_p99_ms,
        r.hostile.failed,
        r.ttft_p99_ratio,
        "met" if r.target_met else "MISSED",
    )


SCRIPT = Script(
    name="hostile_mix",
    doc=__doc__,
    params=Params,
    run=run,
    result_path=lambda _args: RESULTS / "hostile_mix.json",
    summarize=summarize,
)

if __name__ == "__main__":
    raise SystemExit(main(SCRIPT))
