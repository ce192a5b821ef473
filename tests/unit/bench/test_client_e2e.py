"""End-to-end accounting against a tiny OpenAI-like streaming server on 127.0.0.1."""

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
from aiohttp import web

from lightspeed.bench.client import OpenAIClient, make_session
from lightspeed.bench.config import BenchConfig
from lightspeed.bench.runner import open_loop, run_bench
from lightspeed.bench.workload import RequestSpec

FIRST_DELAY = 0.05
GAP = 0.02
TOKENS = ["a", "b", "", "d"]  # "" = a token that ends mid-character: still a token
SLACK = 0.003  # timer granularity of asyncio.sleep vs perf_counter
BODIES = web.AppKey("bodies", list)


def _sse(obj: object) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


async def _completions(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    request.app[BODIES].append({**body, "_session": request.headers.get("x-session-id")})
    if body["model"] == "busy":
        return web.json_response({"error": {"message": "all workers busy"}}, status=503)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await asyncio.sleep(FIRST_DELAY)
    for i, text in enumerate(TOKENS):
        if i:
            await asyncio.sleep(GAP)
        await resp.write(_sse({"choices": [{"text": text, "index": 0}], "usage": None}))
    await resp.write(_sse({"choices": [{"text": "", "index": 0, "finish_reason": "length"}]}))
    if body["model"] != "nousage":
        usage = {
            "prompt_tokens": len(body["prompt"]),
            "completion_tokens": len(TOKENS),
            "prompt_tokens_details": {"cached_tokens": 8},
        }
        await resp.write(_sse({"choices": [], "usage": usage}))
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def _models(_request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [{"id": "fake-model"}]})


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, list[dict]]]:
    app = web.Application()
    app[BODIES] = []
    app.router.add_post("/v1/completions", _completions)
    app.router.add_get("/v1/models", _models)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}", app[BODIES]
    await runner.cleanup()


def _cfg(url: str, **kw: object) -> BenchConfig:
    base: dict = {"url": url, "concurrency": 2, "num_requests": 4, "isl": 16, "osl": 4, "progress": False}
    return BenchConfig(**{**base, **kw})


async def test_ttft_itl_and_usage_accounting(server: tuple[str, list[dict]], tmp_path: Path) -> None:
    url, bodies = server
    report = await run_bench(_cfg(url, out_dir=str(tmp_path), save_requests=True, warmup=1))
    assert report.model == "fake-model"
    lines = (tmp_path / "requests.jsonl").read_bytes().splitlines()
    results = [msgspec.json.decode(line) for line in lines]
    assert len(results) == 4 and len(bodies) == 5  # warmup sent but not reported
    for r in results:
        assert r["error"] is None and r["status"] == 200
        assert FIRST_DELAY - SLACK <= r["ttft_s"] < FIRST_DELAY + 0.2
        assert len(r["itls_s"]) == 3
        assert all(GAP - SLACK <= x < GAP + 0.2 for x in r["itls_s"])
        assert r["e2e_s"] >= r["ttft_s"] + sum(r["itls_s"])
        assert (r["output_tokens"], r["prompt_tokens"], r["cached_tokens"]) == (4, 16, 8)
    s = report.summary
    assert (s.completed, s.failed, s.total_output_tokens, s.total_prompt_tokens) == (4, 0, 16, 64)
    assert s.prefix_cache_hit_rate == 0.5
    body = bodies[-1]
    assert body["model"] == "fake-model" and body["max_tokens"] == 4
    assert body["stream"] is True and body["ignore_eos"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert len(body["prompt"]) == 16 and all(100 <= t < 49152 for t in body["prompt"])
    saved = msgspec.json.decode((tmp_path / "report.json").read_bytes())
    assert saved["summary"]["completed"] == 4
    assert (tmp_path / "timeseries.png").exists() and (tmp_path / "latency_cdf.png").exists()


async def test_http_errors_are_counted_by_reason(server: tuple[str, list[dict]]) -> None:
    url, _ = server
    report = await run_bench(_cfg(url, model="busy", num_requests=3))
    assert (report.summary.completed, report.summary.failed) == (0, 3)
    assert report.summary.failures == {"http_503": 3}
    assert "all workers busy" in report.summary.error_samples["http_503"]


async def test_counts_chunks_when_server_sends_no_usage(server: tuple[str, list[dict]]) -> None:
    url, _ = server
    report = await run_bench(_cfg(url, model="nousage", num_requests=2, ignore_eos=False))
    s = report.summary
    assert (s.completed, s.total_output_tokens, s.total_prompt_tokens) == (2, 8, 32)
    assert s.prefix_cache_hit_rate is None


async def test_connection_refused_is_a_failure_not_a_crash() -> None:
    async with make_session(1, 5.0) as session:
        client = OpenAIClient(session, "http://127.0.0.1:9/v1/completions", "m")
        result = await client.send(RequestSpec((101, 102), 1))
    assert result.error == "connection" and result.status == 0


async def test_open_loop_follows_arrivals_with_speedup(server: tuple[str, list[dict]]) -> None:
    url, _ = server
    specs = [RequestSpec((101,), 1, True, t) for t in (1.0, 1.2, 1.4)]
    async with make_session(0, 5.0) as session:
        client = OpenAIClient(session, url + "/v1/completions", "fake-model")
        results, lag = await open_loop(client, iter(specs), 2.0, 0, None, lambda _r: None)
    starts = sorted(r.start_s for r in results)
    assert len(results) == 3 and lag < 0.05
    assert starts[1] - starts[0] == pytest.approx(0.1, abs=0.03)
    assert starts[2] - starts[0] == pytest.approx(0.2, abs=0.03)


@pytest.mark.parametrize("send", [True, False])
async def test_session_ids_are_sent_as_a_header_unless_turned_off(server: tuple[str, list[dict]], send: bool) -> None:
    url, bodies = server
    async with make_session(1, 10.0) as session:
        client = OpenAIClient(session, url + "/v1/completions", "fake-model", session_ids=send)
        await client.send(RequestSpec((1, 2, 3), 2, session_id="s7"))
        await client.send(RequestSpec((1, 2, 3), 2))
    assert [b["_session"] for b in bodies] == (["s7", None] if send else [None, None])
