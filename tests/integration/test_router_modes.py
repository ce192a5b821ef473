"""The power-of-two and kv-latency router modes through a real `lightspeed serve` (mocker workers).

The response header x-worker-instance-id names the worker that served each request, so these
tests see routing decisions from the outside, as a client would; the same header on a request
pins it to a worker, which is how load and cache contents are set up on purpose.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest

from tests.integration.conftest import MODEL, Server, start_serve, stop_serve
from tests.polling import until

WORKER_HEADER = "x-worker-instance-id"
BS = 16
MOCKER = ["--engine", "mocker", "--block-size", str(BS), "--num-gpu-blocks", "1024"]


def worker_ids(server: Server) -> list[str]:
    return sorted(w["instance_id"] for w in server.health()["workers"])


def gauge(server: Server, name: str) -> float:
    """Sum of a metric's samples on /metrics (0 when it has none yet)."""
    values = re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", server.metrics(), re.M)
    return sum(float(v) for v in values)


async def complete(
    http: aiohttp.ClientSession, server: Server, prompt: list[int], max_tokens: int = 1, pin: str | None = None
) -> tuple[str, dict]:
    """A whole completion; returns the worker that served it and the body."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True}
    headers = {WORKER_HEADER: pin} if pin is not None else {}
    async with http.post(server.base_url + "/completions", json=body, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        return resp.headers[WORKER_HEADER], await resp.json()


async def hold(
    http: aiohttp.ClientSession, server: Server, prompt: list[int], pin: str | None = None
) -> tuple[str, aiohttp.ClientResponse]:
    """Start a long stream and leave it running; returns its worker and the open response."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 5000, "ignore_eos": True, "stream": True}
    headers = {WORKER_HEADER: pin} if pin is not None else {}
    resp = await http.post(server.base_url + "/completions", json=body, headers=headers)
    assert resp.status == 200
    return resp.headers[WORKER_HEADER], resp  # headers come after routing: its load is recorded


# ------------------------------------------------------------------ power-of-two


@pytest.fixture(scope="module")
def p2c_server() -> Iterator[Server]:
    # Speedup 1: a 5000-token stream runs for ~30 s, far longer than the test holds it.
    server = start_serve([*MOCKER, "--router-mode", "power-of-two", "--speedup-ratio", "1"], workers=2)
    yield server
    assert stop_serve(server) == 0


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_power_of_two_sends_new_requests_to_the_less_loaded_worker(
    p2c_server: Server, http: aiohttp.ClientSession
) -> None:
    a, b = worker_ids(p2c_server)
    held = [await hold(http, p2c_server, [100 + i] * BS, pin=a) for i in range(2)]
    # With two workers both are always sampled, so the less loaded one must win every time:
    # b (0 requests, then 1) over a (2). Round-robin would give a one of them; random, 3 in 4 runs.
    for i in range(2):
        held.append(await hold(http, p2c_server, [200 + i] * BS))
    assert [w for w, _ in held] == [a, a, b, b]
    for _, resp in held:
        resp.close()  # the client goes away: the frontend frees the load and cancels the work
    await until(lambda: gauge(p2c_server, "lightspeed_frontend_inflight_requests") == 0, what="the streams freed")


async def test_power_of_two_spreads_requests_when_the_load_is_equal(
    p2c_server: Server, http: aiohttp.ClientSession
) -> None:
    await until(lambda: gauge(p2c_server, "lightspeed_frontend_inflight_requests") == 0, what="an idle frontend")
    served = Counter([(await complete(http, p2c_server, [300 + i] * BS))[0] for i in range(16)])
    # Equal (zero) load: the sampled pair ties and either may win; all 16 on one worker has
    # probability 2^-15 if the choice is random, and is certain if it is stuck on one worker.
    assert set(served) == set(worker_ids(p2c_server)) and sum(served.values()) == 16


# ------------------------------------------------------------------ kv-latency


@pytest.fixture(scope="module")
def latency_server() -> Iterator[Server]:
    server = start_serve([*MOCKER, "--router-mode", "kv-latency", "--speedup-ratio", "10"], workers=2)
    yield server
    assert stop_serve(server) == 0


async def test_kv_latency_sends_a_repeated_prefix_to_the_worker_that_cached_it(
    latency_server: Server, http: aiohttp.ClientSession
) -> None:
    a, b = worker_ids(latency_server)
    blocks = 16
    prefix = {a: [1000 + i for i in range(blocks * BS)], b: [5000 + i for i in range(blocks * BS)]}
    for worker, tokens in prefix.items():  # a caches one long prefix, b the other
        served, _ = await complete(http, latency_server, tokens, pin=worker)
        assert served == worker
    await until(
        lambda: gauge(latency_server, "lightspeed_router_indexed_blocks") >= 2 * blocks,
        what="both prefixes in the router's index (KV events)",
    )
    for round_ in range(3):
        for worker, tokens in prefix.items():
            served, body = await complete(http, latency_server, [*tokens, 9000 + round_])
            assert served == worker  # the cached prefix makes this worker's predicted TTFT lowest
            assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == blocks * BS
