"""API keys: the keys file format, lookup by digest, and the gate in front of a real aiohttp app."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from lightspeed.errors import Unauthorized
from lightspeed.frontend.auth import API_KEY, AuthGate, KeyStore, parse_keys
from lightspeed.frontend.rate_limit import Limits, RateLimiter
from lightspeed.frontend.routes import error_response

DEFAULTS = Limits(rpm=5, tpm=0)


def test_parse_keys_file_with_names_limits_and_comments() -> None:
    text = (
        "# team keys\n\nsk-alpha-0001 name=alpha rpm=10\nsk-beta-00002   # no attributes\nsk-gamma-003 tpm=500 name=g\n"
    )
    parsed = parse_keys(text, DEFAULTS)
    assert parsed == [
        ("sk-alpha-0001", parsed[0][1]),
        ("sk-beta-00002", parsed[1][1]),
        ("sk-gamma-003", parsed[2][1]),
    ]
    assert [(k.name, k.limits) for _, k in parsed] == [
        ("alpha", Limits(10.0, 0.0)),
        ("key4", Limits(5.0, 0.0)),  # default name from the line number, default limits
        ("g", Limits(5.0, 500.0)),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("short\n", "line 1: an API key must be >= 8"),
        ("sk-okay-key rpm\n", "line 1: expected name=..."),
        ("sk-okay-key colour=red\n", "line 1: expected name=..."),
        ("\nsk-okay-key rpm=-2\n", "line 2: rpm must be"),
        ("sk-okay-key rpm=lots\n", "line 1: could not convert"),
    ],
)
def test_bad_keys_file_lines_name_the_line(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_keys(text, DEFAULTS)


def test_store_refuses_duplicates_and_emptiness(tmp_path: Path) -> None:
    f = tmp_path / "keys"
    f.write_text("sk-same-key-1 name=a\nsk-same-key-1 name=b\n")
    with pytest.raises(ValueError, match="listed twice"):
        KeyStore.load("", str(f), DEFAULTS)
    f.write_text("sk-key-number-1 name=a\nsk-key-number-2 name=a\n")
    with pytest.raises(ValueError, match="two API keys are named 'a'"):
        KeyStore.load("", str(f), DEFAULTS)
    f.write_text("# nothing\n")
    with pytest.raises(ValueError, match="none is configured"):
        KeyStore.load("", str(f), DEFAULTS)
    with pytest.raises(ValueError, match="cannot read API keys file"):
        KeyStore.load("", str(tmp_path / "missing"), DEFAULTS)


def test_authenticate() -> None:
    store = KeyStore.load("sk-the-default", "", DEFAULTS)
    assert store.authenticate("Bearer sk-the-default").name == "default"
    assert store.authenticate("bearer   sk-the-default ").name == "default"
    cases = {None: "missing_api_key", "": "missing_api_key", "Basic abc": "invalid_api_key"}
    cases |= {"Bearer": "invalid_api_key", "Bearer sk-wrong-key": "invalid_api_key"}
    for header, code in cases.items():
        with pytest.raises(Unauthorized) as err:
            store.authenticate(header)
        assert err.value.code == code
        assert err.value.status == 401


@pytest.fixture
async def client() -> AsyncIterator[TestClient[web.Request, web.Application]]:
    store = KeyStore(parse_keys("sk-limited-1 name=lim rpm=2\nsk-unlimited name=free rpm=0\n", Limits()))
    gate = AuthGate(store, RateLimiter(store.limits()), {"/live"}, error_response)

    async def whoami(request: web.Request) -> web.Response:
        return web.json_response({"key": request[API_KEY]})

    async def live(request: web.Request) -> web.Response:
        return web.json_response({"status": "live"})

    app = web.Application(middlewares=[gate.middleware])
    app.add_routes([web.post("/v1/completions", whoami), web.get("/v1/models", whoami), web.get("/live", live)])
    async with TestClient(TestServer(app)) as c:
        yield c


async def test_gate_refuses_without_a_key_with_openai_error_json(
    client: TestClient[web.Request, web.Application],
) -> None:
    r = await client.post("/v1/completions")
    assert r.status == 401
    body = await r.json()
    assert body["error"]["code"] == "missing_api_key"
    assert body["error"]["type"] == "invalid_request_error"
    r = await client.get("/v1/models", headers={"Authorization": "Bearer sk-nope-nope"})
    assert r.status == 401
    assert (await r.json())["error"]["message"] == "incorrect API key provided"
    r = await client.get("/nowhere")  # unknown paths do not reveal themselves without a key
    assert r.status == 401
    r = await client.get("/live")
    assert r.status == 200


async def test_gate_rate_limits_posts_per_key_with_retry_after(
    client: TestClient[web.Request, web.Application],
) -> None:
    lim = {"Authorization": "Bearer sk-limited-1"}
    for _ in range(2):
        r = await client.post("/v1/completions", headers=lim)
        assert r.status == 200
        assert await r.json() == {"key": "lim"}
    r = await client.post("/v1/completions", headers=lim)
    assert r.status == 429
    assert r.headers["Retry-After"] == "30"  # 2 per minute: the next one in 30 s
    assert (await r.json())["error"]["code"] == "rate_limit_requests"
    r = await client.get("/v1/models", headers=lim)  # GETs are not counted
    assert r.status == 200
    free = {"Authorization": "Bearer sk-unlimited"}
    for _ in range(5):
        r = await client.post("/v1/completions", headers=free)
        assert r.status == 200
