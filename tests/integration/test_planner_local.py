"""`serve --planner` with the local connector scales a live mocker fleet up under load and back
down when the load falls, and no request fails: a retired worker is deregistered first, then
drains its in-flight streams before it exits.

The workers are made small (4 sequences, a 1,024-token cache) so the planner's arithmetic asks
for more than one at a few requests per second: at ISL 100 / OSL 50 a worker decodes a batch
of 4 at KV usage 0.49, 26.2 ms a step (Dynamo's fit), so it serves 4 / (50 * 0.0262) = 3.05
req/s; 8 req/s needs 3 workers, 1 req/s needs 1.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import msgspec

from tests.integration.conftest import MOCKER_ARGS, Server, start_serve, stop_serve

OSL = 50
PLANNER = [
    "--planner",
    "--mode", "throughput",
    "--adjustment-interval", "2",
    "--min-workers", "1",
    "--max-workers", "3",
    "--ttft-slo", "2",
    "--itl-slo", "0.05",
]  # fmt: skip
SMALL_WORKERS = ["--num-gpu-blocks", "64", "--block-size", "16", "--max-model-len", "512", "--max-num-seqs", "4"]


async def one_request(http: aiohttp.ClientSession, url: str, model: str, i: int) -> str:
    """Stream one completion; '' when it finished whole, else what went wrong."""
    body = {"model": model, "prompt": [100 + (i + k) % 500 for k in range(100)], "max_tokens": OSL}
    body |= {"ignore_eos": True, "stream": True}
    tokens, finish = 0, None
    try:
        async with http.post(url + "/v1/completions", json=body) as resp:
            if resp.status != 200:
                return f"status {resp.status}: {await resp.text()}"
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = msgspec.json.decode(line[6:])
                if "error" in event:
                    return f"error event {event['error']}"
                for choice in event.get("choices", []):
                    tokens += 1 if choice.get("text") is not None else 0
                    finish = choice.get("finish_reason") or finish
    except aiohttp.ClientError as err:
        return f"transport: {err!r}"
    return "" if finish == "length" else f"finish {finish!r} after {tokens} chunks"


async def drive(http: aiohttp.ClientSession, url: str, model: str, rate: float, seconds: float) -> list[str]:
    tasks = []
    for i in range(int(rate * seconds)):
        tasks.append(asyncio.create_task(one_request(http, url, model, i)))
        await asyncio.sleep(1 / rate)
    return list(await asyncio.gather(*tasks))


async def watch_workers(http: aiohttp.ClientSession, server: Server, seen: list[int], stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            async with http.get(server.url + "/health") as resp:
                seen.append(len((await resp.json()).get("workers", [])))
        except (aiohttp.ClientError, ValueError):
            pass
        await asyncio.sleep(0.2)


async def test_planner_scales_a_live_fleet_up_and_down_without_failing_a_request(tmp_path: Path) -> None:
    log = tmp_path / "decisions.jsonl"
    server = start_serve([*MOCKER_ARGS, *SMALL_WORKERS, *PLANNER, "--decision-log", str(log)], workers=1)
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(server.url + "/v1/models") as resp:
                model = (await resp.json())["data"][0]["id"]
            seen: list[int] = []
            stop = asyncio.Event()
            watcher = asyncio.create_task(watch_workers(http, server, seen, stop))
            high = await drive(http, server.url, model, rate=8.0, seconds=12.0)
            peak = max(seen)
            low = await drive(http, server.url, model, rate=1.0, seconds=14.0)
            stop.set()
            await watcher
    finally:
        assert stop_serve(server) == 0
    decisions = [json.loads(line)["decision"]["replicas"] for line in log.read_text().splitlines()]
    failures = [f for f in high + low if f]
    assert failures == [], failures[:5]
    assert len(high) + len(low) == 96 + 14
    assert max(decisions) >= 2 and peak >= 2, (decisions, seen)  # scaled up under load
    assert decisions[-1] == 1 and seen[-1] == 1, (decisions, seen)  # and back down
