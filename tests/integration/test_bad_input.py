"""Every kind of bad input gets an OpenAI-style error with the right 4xx, and the server lives on."""

from __future__ import annotations

import aiohttp
import pytest

from tests.integration.conftest import MODEL, Server, free_port
from tests.polling import until

CHAT = "/v1/chat/completions"
COMPL = "/v1/completions"
HELLO = [{"role": "user", "content": "hi"}]


async def post(server: Server, path: str, data: bytes | None = None, json: object = None) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session:
        kwargs = {"data": data} if data is not None else {"json": json}
        async with session.post(server.url + path, headers={"Content-Type": "application/json"}, **kwargs) as r:
            return r.status, await r.json(content_type=None)


CASES = [
    ("malformed json", CHAT, b'{"model": "x", "messages": [', None, 400, None),
    ("empty body", CHAT, b"", None, 400, None),
    ("not an object", CHAT, b"[1, 2]", None, 400, None),
    ("wrong type", COMPL, None, {"model": MODEL, "prompt": "x", "max_tokens": "ten"}, 400, None),
    ("missing messages", CHAT, None, {"model": MODEL}, 400, None),
    ("unknown model", CHAT, None, {"model": "gpt-9", "messages": HELLO}, 404, "model"),
    ("empty messages", CHAT, None, {"model": MODEL, "messages": []}, 400, "messages"),
    ("message without role", CHAT, None, {"model": MODEL, "messages": [{"content": "x"}]}, 400, None),
    ("max_tokens zero", CHAT, None, {"model": MODEL, "messages": HELLO, "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens negative", COMPL, None, {"model": MODEL, "prompt": "x", "max_tokens": -3}, 400, "max_tokens"),
    (
        "max_tokens beyond context",
        COMPL,
        None,
        {"model": MODEL, "prompt": "x", "max_tokens": 100000},
        400,
        "max_tokens",
    ),
    (
        "prompt longer than context",
        COMPL,
        None,
        {"model": MODEL, "prompt": [200] * 9000, "max_tokens": 1},
        400,
        "prompt",
    ),
    ("empty prompt", COMPL, None, {"model": MODEL, "prompt": ""}, 400, "prompt"),
    ("token id out of vocab", COMPL, None, {"model": MODEL, "prompt": [1, 10**7]}, 400, "prompt"),
    ("batch of prompts", COMPL, None, {"model": MODEL, "prompt": ["a", "b"]}, 400, "prompt"),
    ("temperature out of range", CHAT, None, {"model": MODEL, "messages": HELLO, "temperature": 5}, 400, "temperature"),
    ("n > 1", CHAT, None, {"model": MODEL, "messages": HELLO, "n": 2}, 400, "n"),
    (
        "bad content part",
        CHAT,
        None,
        {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        400,
        None,
    ),
]


@pytest.mark.parametrize(("name", "path", "raw", "body", "status", "param"), CASES, ids=[c[0] for c in CASES])
async def test_bad_input(
    mocker_server: Server, name: str, path: str, raw: bytes | None, body: object, status: int, param: str | None
) -> None:
    got, payload = await post(mocker_server, path, data=raw, json=body)
    assert got == status, payload
    error = payload["error"]
    assert error["message"] and error["type"]
    if param is not None:
        assert error["param"] == param
    # ... and the server keeps serving.
    ok, _ = await post(mocker_server, COMPL, json={"model": MODEL, "prompt": "ok", "max_tokens": 1})
    assert ok == 200


async def test_body_over_limit_is_413(mocker_server: Server) -> None:
    big = {"model": MODEL, "prompt": "x" * (300 * 1024)}
    status, payload = await post(mocker_server, COMPL, json=big)
    assert status == 413
    assert payload["error"]["type"] == "invalid_request_error"


async def test_unknown_route_and_method(mocker_server: Server) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(mocker_server.url + "/v1/nothing") as r:
            assert r.status == 404 and "error" in await r.json()
        async with session.get(mocker_server.url + CHAT) as r:
            assert r.status == 405 and "error" in await r.json()


async def test_no_workers_is_503() -> None:
    """A frontend alone (no workers registered) answers 503 on /health and requests."""
    import asyncio
    import sys

    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "lightspeed",
        "frontend",
        "--port",
        str(port),
        "--discovery",
        "file",
        "--discovery-path",
        f"/tmp/lightspeed-empty-{port}",
    )
    try:
        server = Server(f"http://127.0.0.1:{port}", proc)  # type: ignore[arg-type]
        async with aiohttp.ClientSession() as session:

            async def live() -> bool:
                try:
                    async with session.get(server.url + "/live") as r:
                        return r.status == 200
                except aiohttp.ClientError:  # not listening yet
                    return False

            await until(live, timeout=30, what="the frontend to listen")
            async with session.get(server.url + "/health") as r:
                assert r.status == 503
            async with session.get(server.url + "/v1/models") as r:
                assert (await r.json())["data"] == []
        status, payload = await post(server, COMPL, json={"model": MODEL, "prompt": "x"})
        assert status == 503 and payload["error"]["type"] == "service_unavailable"
    finally:
        proc.terminate()
        assert await proc.wait() == 0
