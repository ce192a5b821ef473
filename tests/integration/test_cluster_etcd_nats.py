"""Cluster mode end to end: a frontend and two mocker workers, each its own `lightspeed` process,
finding each other through a real etcd and exchanging KV events and load metrics over a real
NATS (JetStream); requests over HTTP. The KV router must send a repeated prompt back to the
worker that cached it, which it can only know from KV events that came over NATS; a SIGKILLed
worker must leave discovery when its etcd lease expires."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import lightspeed.runtime.discovery_etcd  # noqa: F401 (registers the etcd backend)
from lightspeed.runtime.discovery import DiscoverySpec, build_discovery
from tests.integration.cluster_servers import (
    EtcdServer,
    NatsServer,
    cluster_flags,
    etcd_server,  # noqa: F401 (fixture)
    free_port,
    lightspeed_cmd,
    nats_server,  # noqa: F401 (fixture)
    start_process,
    stop_process,
)
from tests.integration.conftest import MODEL

BS = 16
WORKER_ARGS = ["--engine", "mocker", "--block-size", str(BS), "--num-gpu-blocks", "512", "--speedup-ratio", "50"]


@dataclass
class Fleet:
    url: str
    frontend: subprocess.Popen[bytes]
    workers: list[subprocess.Popen[bytes]]
    logs: Path
    flags: list[str]
    etcd: EtcdServer
    nats: NatsServer

    def start_frontend(self) -> None:
        """A (new) frontend process on a fresh port; `url` follows it."""
        port = free_port()
        self.frontend = start_process(
            lightspeed_cmd("frontend", "--port", str(port), "--router-mode", "kv", *self.flags),
            self.logs / f"frontend-{port}.log",
        )
        self.url = f"http://127.0.0.1:{port}"
        wait(lambda: len(health_workers(self.url)) == len(self.workers), "the workers in the frontend's discovery")


def http_json(url: str, body: dict | None = None, timeout: float = 10.0) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")
    except OSError:
        return 0, {}


def metric(url: str, name: str) -> dict[str, float]:
    """Samples of one metric from /metrics: label string -> value."""
    with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {m[1] or "": float(m[2]) for m in re.finditer(rf"^{name}(\{{[^}}]*\}})? (\S+)$", text, re.M)}


def wait(cond: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def health_workers(url: str) -> list[dict]:
    return http_json(url + "/health", timeout=2)[1].get("workers", [])


def complete(url: str, prompt: list[int]) -> dict:
    status, body = http_json(
        url + "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 3, "ignore_eos": True}
    )
    assert status == 200, body
    assert body["usage"]["completion_tokens"] == 3
    return body


@pytest.fixture
def fleet(etcd_server: EtcdServer, nats_server: NatsServer, tmp_path: Path) -> Iterator[Fleet]:  # noqa: F811
    flags = cluster_flags(etcd_server.url, nats_server.url, "e2e")
    workers = [
        start_process(lightspeed_cmd("worker", *WORKER_ARGS, *flags), tmp_path / f"worker{i}.log") for i in range(2)
    ]
    fleet = Fleet("", workers[0], workers, tmp_path, flags, etcd_server, nats_server)
    try:
        fleet.start_frontend()
        yield fleet
    finally:
        for proc in [fleet.frontend, *workers]:
            stop_process(proc)


def served_by(url: str, prompt: list[int]) -> str:
    """The worker the KV router picked for `prompt` (from its per-worker decision counter)."""
    before = metric(url, "lightspeed_router_decisions_total")
    complete(url, prompt)
    after = metric(url, "lightspeed_router_decisions_total")
    changed = [labels for labels, value in after.items() if value != before.get(labels, 0.0)]
    assert len(changed) == 1, (before, after)
    return re.sub(r'.*worker="([^"]+)".*', r"\1", changed[0])


def test_frontend_and_two_workers_on_etcd_and_nats(fleet: Fleet) -> None:
    url = fleet.url
    prompts = [[5000 + 100 * k + i for i in range(4 * BS)] for k in range(12)]
    first: dict[int, str] = {}
    for k, prompt in enumerate(prompts):  # ties break at random: both workers get some
        first[k] = served_by(url, prompt)
        if len(set(first.values())) == 2 and k >= 3:
            break
    assert len(set(first.values())) == 2, "one worker never served a request"
    # Each served prompt left 4 blocks on its worker; the router hears of them over NATS.
    wait(lambda: metric(url, "lightspeed_router_indexed_blocks")[""] >= 4 * len(first), "KV events over NATS", 10)
    for k, worker in first.items():
        assert served_by(url, prompts[k]) == worker, f"prompt {k} left its cached worker"
    # Load metrics from both workers came over NATS as well.
    wait(lambda: len(metric(url, "lightspeed_worker_kv_total_blocks")) == 2, "load metrics of both workers", 10)
    assert sorted(metric(url, "lightspeed_worker_kv_total_blocks").values()) == [512.0, 512.0]

    # SIGKILL: no deregistration, so the card goes when its 2 s lease expires.
    victim = fleet.workers[0]
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    wait(lambda: len(health_workers(url)) == 1, "the killed worker's lease to expire", 10)
    complete(url, prompts[0])


def test_restarted_frontend_replays_kv_events_from_jetstream(fleet: Fleet) -> None:
    prompts = [[9000 + 100 * k + i for i in range(4 * BS)] for k in range(6)]
    first = {k: served_by(fleet.url, prompt) for k, prompt in enumerate(prompts)}
    wait(lambda: metric(fleet.url, "lightspeed_router_indexed_blocks")[""] >= 4 * len(prompts), "KV events", 10)
    indexed = metric(fleet.url, "lightspeed_router_indexed_blocks")[""]

    stop_process(fleet.frontend)
    fleet.start_frontend()
    # The new router rebuilt its index from the workers' retained events on the stream...
    wait(lambda: metric(fleet.url, "lightspeed_router_indexed_blocks")[""] == indexed, "the replayed index", 10)
    # ...without asking any worker for a dump (a dump counts as a resync).
    assert metric(fleet.url, "lightspeed_router_kv_resyncs_total") == {"": 0.0}
    for k, worker in first.items():
        assert served_by(fleet.url, prompts[k]) == worker, f"prompt {k} left its cached worker"


def cards_in_etcd(fleet: Fleet) -> list[str]:
    """The workers' cards in etcd right now (the frontend registers a router card too)."""

    async def read() -> list[str]:
        etcd = build_discovery("etcd", DiscoverySpec(fleet.etcd.url, "e2e"))
        try:
            return [card.instance_id for card in await etcd.list_cards() if card.component == "backend"]
        except Exception:  # etcd still starting
            return []
        finally:
            await etcd.close()

    return asyncio.run(read())


@pytest.mark.slow
def test_fleet_survives_nats_and_etcd_restarts(fleet: Fleet) -> None:
    url = fleet.url
    prompts = [[11000 + 100 * k + i for i in range(4 * BS)] for k in range(8)]
    first = {k: served_by(url, prompts[k]) for k in range(4)}
    wait(lambda: metric(url, "lightspeed_router_indexed_blocks")[""] >= 16, "KV events", 10)
    resyncs = metric(url, "lightspeed_router_kv_resyncs_total")[""]  # the fresh workers' first snapshots

    # NATS restarts (same store): publishers and the routers' ordered consumers resume from the
    # stream, so blocks cached after the restart reach the index without any dump.
    fleet.nats.restart()
    for k in range(4, 8):
        first[k] = served_by(url, prompts[k])
    wait(lambda: metric(url, "lightspeed_router_indexed_blocks")[""] >= 32, "KV events after the restart", 20)
    assert metric(url, "lightspeed_router_kv_resyncs_total")[""] == resyncs

    # etcd comes back empty: workers notice their lease is gone, register again, and the frontend
    # (whose watch broke) lists them again; every request after that succeeds.
    fleet.etcd.restart(wipe=True)
    wait(lambda: len(cards_in_etcd(fleet)) == 2, "the workers' cards back in etcd", 20)
    wait(lambda: len(health_workers(url)) == 2, "the workers in the frontend's discovery", 20)
    assert sorted(cards_in_etcd(fleet)) == sorted(w["instance_id"] for w in health_workers(url))
    for k, worker in first.items():
        assert served_by(url, prompts[k]) == worker, f"prompt {k} left its cached worker"
