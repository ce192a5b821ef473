"""A worker killed under `lightspeed serve`: requests keep succeeding, streams migrate, the
supervisor brings a replacement up, and the dead worker leaves discovery. A killed frontend is
restarted on the same port.

Real processes throughout: the workers are SIGKILLed (no clean deregistration, no drain), so the
frontend only learns of it from the request plane (connection dropped / refused) and, later,
from the discovery entry expiring.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import openai
import pytest

from tests.integration.conftest import MODEL, Server, start_serve, stop_serve
from tests.polling import until

WORKER_HEADER = "x-worker-instance-id"
ARGS = ["--engine", "mocker", "--router-mode", "round-robin", "--discovery-ttl", "2", "--num-gpu-blocks", "1024"]


def worker_pids(server: Server) -> dict[str, int]:
    return {w["instance_id"]: w["pid"] for w in server.health().get("workers", [])}


async def sse_events(resp: aiohttp.ClientResponse) -> AsyncIterator[dict]:
    async for raw in resp.content:
        line = raw.decode().strip()
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[len("data: ") :])


def stream_body(max_tokens: int, min_tokens: int = 0) -> dict:
    return {
        "model": MODEL,
        "prompt": list(range(100, 164)),
        "max_tokens": max_tokens,
        "min_tokens": min_tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def kill_mid_stream(
    server: Server, max_tokens: int, kill_after: int, min_tokens: int = 0
) -> tuple[int, list[dict]]:
    """Stream a completion, SIGKILL its worker after `kill_after` chunks; return its pid and the events."""
    pids = worker_pids(server)
    events: list[dict] = []
    async with (
        aiohttp.ClientSession() as http,
        http.post(server.base_url + "/completions", json=stream_body(max_tokens, min_tokens)) as resp,
    ):
        assert resp.status == 200
        victim = pids[resp.headers[WORKER_HEADER]]
        async for event in sse_events(resp):
            events.append(event)
            if len(events) == kill_after:
                os.kill(victim, signal.SIGKILL)
    return victim, events


@pytest.fixture
def server() -> AsyncIterator[Server]:
    """No migration: what succeeds here succeeds without re-sending a started request."""
    srv = start_serve([*ARGS, "--speedup-ratio", "1"], workers=2)
    yield srv
    assert stop_serve(srv) == 0


@dataclass
class Migrated:
    events: list[dict]
    metrics: str  # the frontend's /metrics after the stream ended


@pytest.fixture(scope="module")
def migrated() -> Migrated:
    """One stream whose worker is SIGKILLed after 20 chunks, with migration on (run once)."""
    srv = start_serve([*ARGS, "--speedup-ratio", "1", "--migration-limit", "1"], workers=2)
    try:
        # min_tokens=5 is met before the kill: the continuation must carry min_tokens 0, not
        # 5 - k < 0, which the engine would refuse (an error instead of the rest of the stream).
        _, events = asyncio.run(kill_mid_stream(srv, max_tokens=300, kill_after=20, min_tokens=5))
        metrics = srv.metrics()
    finally:
        assert stop_serve(srv) == 0
    return Migrated(events, metrics)


def test_a_stream_whose_worker_is_killed_migrates_and_completes(migrated: Migrated) -> None:
    events = migrated.events
    assert len(events) > 20 and all("error" not in e for e in events)
    assert events[-1]["usage"]["completion_tokens"] == 300  # tokens from both workers, no gap
    finishes = [c["finish_reason"] for e in events for c in e.get("choices", []) if c["finish_reason"]]
    assert finishes == ["length"]


def test_the_migration_is_counted_on_metrics(migrated: Migrated) -> None:
    assert re.search(r"^lightspeed_frontend_migrations_total\{[^}]*\} 1\.0$", migrated.metrics, re.M)


async def test_requests_right_after_a_kill_succeed_and_a_replacement_joins(server: Server) -> None:
    before = worker_pids(server)
    victim_id, victim_pid = sorted(before.items())[0]
    os.kill(victim_pid, signal.SIGKILL)
    client = openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0)
    # Round-robin would send every other request to the dead worker while its discovery entry
    # lives on: each must still succeed (dial refused -> worker reported down -> sent elsewhere).
    for _ in range(8):
        out = client.completions.create(model=MODEL, prompt=[1, 2, 3, 4], max_tokens=4, extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == 4
    # Pinned to the dead worker: it is known down, so 503 (retry later), not 400 (no such worker).
    with pytest.raises(openai.APIStatusError) as err:
        client.completions.create(model=MODEL, prompt=[1, 2], max_tokens=1, extra_headers={WORKER_HEADER: victim_id})
    assert err.value.status_code == 503 and "not reachable" in err.value.message
    # The supervisor restarts the worker under a new instance id; the dead one's entry expires.
    await until(
        lambda: len(worker_pids(server)) == 2 and victim_id not in worker_pids(server),
        what="the replacement worker, without the dead one",
    )
    after = worker_pids(server)
    [new_id] = set(after) - set(before)
    out = client.completions.with_raw_response.create(
        model=MODEL,
        prompt=[5, 6, 7],
        max_tokens=3,
        extra_body={"ignore_eos": True},
        extra_headers={WORKER_HEADER: new_id},
    )
    assert out.headers[WORKER_HEADER] == new_id
    assert out.parse().usage.completion_tokens == 3


async def test_without_migration_the_stream_reports_the_loss_in_band(server: Server) -> None:
    _, events = await kill_mid_stream(server, max_tokens=300, kill_after=10)
    assert events[-1]["error"]["type"] == "service_unavailable"
    assert events[-1]["error"]["code"] is not None
    client = openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0)
    for _ in range(4):  # the next requests avoid the dead worker
        out = client.completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=2, extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == 2


def frontend_pids(server: Server) -> list[int]:
    """The serve process's children that run `lightspeed frontend` (from /proc, Linux)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue  # exited while we looked
        if ppid == server.proc.pid and b"frontend" in argv:
            pids.append(int(entry))
    return pids


async def test_a_killed_frontend_is_restarted_on_the_same_port(server: Server) -> None:
    [old] = frontend_pids(server)
    os.kill(old, signal.SIGKILL)
    await until(
        lambda: len(frontend_pids(server)) == 1 and frontend_pids(server) != [old], what="a new frontend process"
    )
    await until(lambda: len(worker_pids(server)) == 2, what="both workers")  # seen by the new one
    client = openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0)
    out = client.completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=2, extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 2
