"""Every kind of bad input gets an OpenAI-style error with the right 4xx, and the server lives on
without logging an error or a traceback for it (a client's mistake is not the server's)."""

from __future__ import annotations

import gzip
import re
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from tests.integration.conftest import MOCKER_ARGS, MODEL, Server, free_port
from tests.integration.logged_serve import LoggedServer, logged_serve
from tests.polling import until

CHAT = "/v1/chat/completions"
COMPL = "/v1/completions"
HELLO = [{"role": "user", "content": "hi"}]
HUGE = 2**70  # past the 64-bit integers of the request plane: was a 500 at msgpack encoding
DEEP = b"[" * 3000 + b"]" * 3000  # past the decoders' recursion limit: was a 500 (RecursionError)
UNKNOWN_REASON = "this server does not know the field; it refuses it rather than ignore it"


@pytest.fixture(scope="module")
def hostile() -> Iterator[LoggedServer]:
    with logged_serve([*MOCKER_ARGS, "--speedup-ratio", "20", "--num-gpu-blocks", "2048"], workers=2) as server:
        yield server


@pytest.fixture(scope="module")
def mocker_server(hostile: LoggedServer) -> Server:
    return hostile.server


async def post(
    server: Server,
    path: str,
    data: bytes | None = None,
    json: object = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        kwargs = {"data": data} if data is not None else {"json": json}
        all_headers = {"Content-Type": "application/json", **(headers or {})}
        async with session.post(server.url + path, headers=all_headers, **kwargs) as r:
            return r.status, await r.json(content_type=None)


async def assert_refused(
    hostile: LoggedServer, got: tuple[int, dict[str, Any]], status: int, param: str | None, message: str | None
) -> None:
    """An OpenAI error body with this status, param and message; nothing logged at ERROR; and a
    good request still served."""
    code, payload = got
    assert code == status, payload
    error = payload["error"]
    assert error["type"] == ("model_not_found" if status == 404 else "invalid_request_error")
    assert error["message"] and error["code"] in (status, "context_length_exceeded")
    assert error["param"] == param
    if message is not None:
        assert error["message"] == message
    assert hostile.new_error_lines() == []
    ok, _ = await post(hostile.server, COMPL, json={"model": MODEL, "prompt": "ok", "max_tokens": 1})
    assert ok == 200


def unsupported(name: str, reason: str = UNKNOWN_REASON) -> str:
    return f"unsupported field '{name}': {reason}"


TOOLS = "tool and function calling are not supported"
SAMPLING = "this sampling parameter is not supported (temperature, top_p, top_k, seed and the penalties are)"
STRUCTURED = "structured output is not supported"
TEMPLATE = "the model's own chat template is always applied as is"
CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": DEEP.decode()}}
NOT_A_PROMPT = "prompt must be a string, a list of token ids, or a one-element list of either"

# (name, path, raw body, JSON body, status, param, message or None when aiohttp/msgspec words it)
CASES: list[tuple[str, str, bytes | None, object, int, str | None, str | None]] = [
    ("malformed json", CHAT, b'{"model": "x", "messages": [', None, 400, None, None),
    ("empty body", CHAT, b"", None, 400, None, "request body is empty; expected a JSON object"),
    ("not an object", CHAT, b"[1, 2]", None, 400, None, "invalid request: Expected `object`, got `array`"),
    ("wrong type", COMPL, None, {"model": MODEL, "prompt": "x", "max_tokens": "ten"}, 400, "max_tokens", None),
    ("missing messages", CHAT, None, {"model": MODEL}, 400, "messages", None),
    ("unknown model", CHAT, None, {"model": "gpt-9", "messages": HELLO}, 404, "model", None),
    ("empty messages", CHAT, None, {"model": MODEL, "messages": []}, 400, "messages", None),
    (
        "message without role",
        CHAT,
        None,
        {"model": MODEL, "messages": [{"content": "x"}]},
        400,
        "messages[0].role",
        None,
    ),
    ("max_tokens zero", CHAT, None, {"model": MODEL, "messages": HELLO, "max_tokens": 0}, 400, "max_tokens", None),
    ("max_tokens negative", COMPL, None, {"model": MODEL, "prompt": "x", "max_tokens": -3}, 400, "max_tokens", None),
    (
        "max_tokens beyond context",
        COMPL,
        None,
        {"model": MODEL, "prompt": "x", "max_tokens": 100000},
        400,
        "max_tokens",
        None,
    ),
    (
        "prompt longer than context",
        COMPL,
        None,
        {"model": MODEL, "prompt": [200] * 9000, "max_tokens": 1},
        400,
        "prompt",
        None,
    ),
    ("empty prompt", COMPL, None, {"model": MODEL, "prompt": ""}, 400, "prompt", "prompt must not be empty"),
    ("token id out of vocab", COMPL, None, {"model": MODEL, "prompt": [1, 10**7]}, 400, "prompt", None),
    ("batch of prompts", COMPL, None, {"model": MODEL, "prompt": ["a", "b"]}, 400, "prompt", NOT_A_PROMPT),
    (
        "temperature out of range",
        CHAT,
        None,
        {"model": MODEL, "messages": HELLO, "temperature": 5},
        400,
        "temperature",
        None,
    ),
    ("n > 1", CHAT, None, {"model": MODEL, "messages": HELLO, "n": 2}, 400, "n", "only n=1 is supported"),
    (
        "bad content part",
        CHAT,
        None,
        {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        400,
        "messages[0].content[0]",
        "messages[0].content[0]: unsupported content part type 'image_url' (only 'text')",
    ),
    # ---- integers past 64 bits (were 500s at msgpack encoding, with a traceback at ERROR)
    (
        "seed past 64 bits",
        COMPL,
        None,
        {"model": MODEL, "prompt": "x", "seed": 2**64},
        400,
        "seed",
        "seed must be between -9223372036854775808 and 18446744073709551615",
    ),
    ("top_k past 64 bits", COMPL, None, {"model": MODEL, "prompt": "x", "top_k": HUGE}, 400, "top_k", None),
    (
        "stop_token_ids past 64 bits",
        CHAT,
        None,
        {"model": MODEL, "messages": HELLO, "stop_token_ids": [HUGE]},
        400,
        "stop_token_ids",
        "stop_token_ids must be token ids between 0 and 2147483647",
    ),
    (
        "stop_token_ids out of vocab",
        COMPL,
        None,
        {"model": MODEL, "prompt": "x", "stop_token_ids": [10**7]},
        400,
        "stop_token_ids",
        "stop token id 10000000 is out of the vocabulary (size 49152)",
    ),
    (
        "too many stop_token_ids",
        COMPL,
        None,
        {"model": MODEL, "prompt": "x", "stop_token_ids": [2] * 257},
        400,
        "stop_token_ids",
        "at most 256 stop_token_ids are allowed",
    ),
    (
        "min_tokens past 64 bits",
        CHAT,
        None,
        {"model": MODEL, "messages": HELLO, "min_tokens": HUGE},
        400,
        "min_tokens",
        None,
    ),
    (
        "max_tokens past 64 bits",
        CHAT,
        None,
        {"model": MODEL, "messages": HELLO, "max_tokens": HUGE},
        400,
        "max_tokens",
        None,
    ),
    (
        "max_completion_tokens past 64 bits",
        CHAT,
        None,
        {"model": MODEL, "messages": HELLO, "max_completion_tokens": HUGE},
        400,
        "max_completion_tokens",
        None,
    ),
    ("n past 64 bits", COMPL, None, {"model": MODEL, "prompt": "x", "n": HUGE}, 400, "n", "only n=1 is supported"),
    (
        "top_logprobs past 64 bits",
        CHAT,
        None,
        {"model": MODEL, "messages": HELLO, "logprobs": True, "top_logprobs": HUGE},
        400,
        "top_logprobs",
        "top_logprobs must be between 0 and 20",
    ),
    ("logprobs past 64 bits", COMPL, None, {"model": MODEL, "prompt": "x", "logprobs": HUGE}, 400, "logprobs", None),
    # ---- floats past the float range (JSON has no NaN or infinity: 1e999 is how they arrive)
    (
        "temperature infinite",
        CHAT,
        f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "x"}}], "temperature": 1e999}}'.encode(),
        None,
        400,
        "temperature",
        "invalid request: Number out of range - at `$.temperature`",
    ),
    (
        "presence_penalty infinite",
        COMPL,
        f'{{"model": "{MODEL}", "prompt": "x", "presence_penalty": -1e999}}'.encode(),
        None,
        400,
        "presence_penalty",
        None,
    ),
    (
        "router override infinite",
        COMPL,
        f'{{"model": "{MODEL}", "prompt": "x", "nvext": {{"router_config_override": {{"overlap_score_weight": 1e999}}}}}}'.encode(),
        None,
        400,
        "nvext.router_config_override.overlap_score_weight",
        None,
    ),
    (
        "router override negative",
        COMPL,
        None,
        {"model": MODEL, "prompt": "x", "nvext": {"router_config_override": {"router_temperature": -1}}},
        400,
        "nvext.router_config_override.router_temperature",
        "router_temperature must be a finite number >= 0",
    ),
    # ---- deep nesting and bad UTF-8 (were 500s: RecursionError, UnicodeDecodeError)
    (
        "deep nesting in the body",
        COMPL,
        b'{"model": "x", "prompt": ' + DEEP + b"}",
        None,
        400,
        None,
        "request body is nested more than 64 levels deep",
    ),
    (
        "deep nesting in a content part",
        CHAT,
        b'{"model": "x", "messages": [{"role": "user", "content": [{"type": "text", "text": ' + DEEP + b"}]}]}",
        None,
        400,
        None,
        "request body is nested more than 64 levels deep",
    ),
    (
        "deep nesting in tool-call arguments",
        CHAT,
        None,
        {"model": MODEL, "messages": [*HELLO, {"role": "assistant", "tool_calls": [CALL]}]},
        400,
        "messages[1].tool_calls[0].function.arguments",
        "messages[1].tool_calls[0].function.arguments is nested more than 64 levels deep",
    ),
    (
        "invalid utf-8",
        COMPL,
        f'{{"model": "{MODEL}", "prompt": "h'.encode() + b'\xff\xfei"}',
        None,
        400,
        None,
        "request body is not valid JSON: a string is not valid UTF-8 (invalid start byte)",
    ),
    # ---- fields not honoured (were accepted with a 200 and no effect)
    ("tools", CHAT, None, {"model": MODEL, "messages": HELLO, "tools": []}, 400, "tools", unsupported("tools", TOOLS)),
    (
        "tool_choice",
        CHAT,
        None,
        {"model": MODEL, "messages": HELLO, "tool_choice": "auto"},
        400,
        "tool_choice",
        unsupported("tool_choice", TOOLS),
    ),
    (
        "parallel_tool_calls",
        CHAT,
        None,
        {"model": MODEL, "messages": HELLO, "parallel_tool_calls": True},
        400,
        "parallel_tool_calls",
        unsupported("parallel_tool_calls", TOOLS),
    ),
    (
        "functions",
        CHAT,
        None,
        {"model": MODEL, "messages": HELLO, "functions": []},
        400,
        "functions",
        unsupported("functions", TOOLS),
    ),
    (
        "function_call",
        CHAT,
        None,
        {"model": MODEL, "messages": HELLO, "function_call": "none"},
        400,
        "function_call",
        unsupported("function_call", TOOLS),
    ),
    (
        "response_format",
        CHAT,
        None,
        {"model": MODEL, "messages": HELLO, "response_format": {"type": "json_object"}},
        400,
        "response_format",
        unsupported("response_format", STRUCTURED),
    ),
    (
        "guided_regex",
        COMPL,
        None,
        {"model": MODEL, "prompt": "x", "guided_regex": "a+"},
        400,
        "guided_regex",
        unsupported("guided_regex", STRUCTURED),
    ),
    (
        "logit_bias",
        COMPL,
        None,
        {"model": MODEL, "prompt": "x", "logit_bias": {"5": 100}},
        400,
        "logit_bias",
        unsupported("logit_bias", "logit bias is not supported"),
    ),
    (
        "best_of",
        COMPL,
        None,
        {"model": MODEL, "prompt": "x", "best_of": 2},
        400,
        "best_of",
        unsupported("best_of", "only one sequence is generated per request"),
    ),
    (
        "repetition_penalty",
        COMPL,
        None,
        {"model": MODEL, "prompt": "x", "repetition_penalty": 1.2},
        400,
        "repetition_penalty",
        unsupported("repetition_penalty", SAMPLING),
    ),
    (
        "min_p",
        CHAT,
        None,
        {"model": MODEL, "messages": HELLO, "min_p": 0.1},
        400,
        "min_p",
        unsupported("min_p", SAMPLING),
    ),
    ("top_a", COMPL, None, {"model": MODEL, "prompt": "x", "top_a": 0.1}, 400, "top_a", unsupported("top_a", SAMPLING)),
    (
        "include_stop_str_in_output",
        COMPL,
        None,
        {"model": MODEL, "prompt": "x", "stop": ["a"], "include_stop_str_in_output": True},
        400,
        "include_stop_str_in_output",
        unsupported("include_stop_str_in_output", "stop strings are always removed from the output"),
    ),
    (
        "chat_template_kwargs",
        CHAT,
        None,
        {"model": MODEL, "messages": HELLO, "chat_template_kwargs": {"x": 1}},
        400,
        "chat_template_kwargs",
        unsupported("chat_template_kwargs", TEMPLATE),
    ),
    (
        "suffix",
        COMPL,
        None,
        {"model": MODEL, "prompt": "x", "suffix": "y"},
        400,
        "suffix",
        unsupported("suffix", "insertion (suffix) is not supported"),
    ),
    ("echo", COMPL, None, {"model": MODEL, "prompt": "x", "echo": True}, 400, "echo", "echo is not supported"),
    (
        "store",
        CHAT,
        None,
        {"model": MODEL, "messages": HELLO, "store": True},
        400,
        "store",
        "store=true is not supported: completions are not stored",
    ),
    ("unknown field", COMPL, None, {"model": MODEL, "prompt": "x", "zzz": 1}, 400, "zzz", unsupported("zzz")),
    (
        "unknown message field",
        CHAT,
        None,
        {"model": MODEL, "messages": [{"role": "user", "content": "x", "refusal": "no"}]},
        400,
        "messages[0].refusal",
        unsupported("refusal"),
    ),
    # ---- logprobs from an engine that computes none (were logprobs=null in a 200)
    (
        "chat logprobs on the mocker",
        CHAT,
        None,
        {"model": MODEL, "messages": HELLO, "logprobs": True},
        400,
        "logprobs",
        f"logprobs are not available: model '{MODEL}' is served by the mocker engine, "
        "which computes no log probabilities",
    ),
    (
        "completion logprobs on the mocker",
        COMPL,
        None,
        {"model": MODEL, "prompt": "x", "logprobs": 2},
        400,
        "logprobs",
        f"logprobs are not available: model '{MODEL}' is served by the mocker engine, "
        "which computes no log probabilities",
    ),
]


@pytest.mark.parametrize(
    ("name", "path", "raw", "body", "status", "param", "message"), CASES, ids=[c[0] for c in CASES]
)
async def test_bad_input(
    hostile: LoggedServer,
    name: str,
    path: str,
    raw: bytes | None,
    body: object,
    status: int,
    param: str | None,
    message: str | None,
) -> None:
    got = await post(hostile.server, path, data=raw, json=body)
    await assert_refused(hostile, got, status, param, message)


@pytest.mark.parametrize(
    ("header", "value", "message"),
    [
        ("x-router-overlap-weight", "nan", "header x-router-overlap-weight must be a number, got 'nan'"),
        ("x-router-overlap-weight", "inf", "header x-router-overlap-weight must be a number, got 'inf'"),
        ("x-router-overlap-weight", "-1", "header x-router-overlap-weight must be >= 0, got '-1'"),
        ("x-router-temperature", "-inf", "header x-router-temperature must be a number, got '-inf'"),
    ],
)
async def test_bad_router_header(hostile: LoggedServer, header: str, value: str, message: str) -> None:
    body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
    got = await post(hostile.server, COMPL, json=body, headers={header: value})
    await assert_refused(hostile, got, 400, header, message)


GZIP = {"Content-Encoding": "gzip"}


async def test_gzip_body_is_decoded(hostile: LoggedServer) -> None:
    raw = gzip.compress(f'{{"model": "{MODEL}", "prompt": "x", "max_tokens": 2}}'.encode())
    status, payload = await post(hostile.server, COMPL, data=raw, headers=GZIP)
    assert status == 200 and payload["usage"]["completion_tokens"] == 2


async def test_bad_gzip_is_400(hostile: LoggedServer) -> None:
    """Was a 500 with a traceback, and a second one from aiohttp draining the body."""
    got = await post(hostile.server, COMPL, data=b"not gzip at all", headers=GZIP)
    message = "request body is not valid gzip: Error -3 while decompressing data: incorrect header check"
    await assert_refused(hostile, got, 400, None, message)


async def test_gzip_bomb_is_413(hostile: LoggedServer) -> None:
    """50 MB once decompressed, 50 kB on the wire: refused after the first 256 KiB of output."""
    bomb = gzip.compress(b'{"model": "x", "prompt": "' + b"x" * 50_000_000 + b'"}')
    assert len(bomb) < 256 * 1024
    got = await post(hostile.server, COMPL, data=bomb, headers=GZIP)
    message = f"request body is too large: more than {256 * 1024} bytes once decompressed"
    await assert_refused(hostile, got, 413, None, message)


async def test_unsupported_encoding_is_415(hostile: LoggedServer) -> None:
    got = await post(hostile.server, COMPL, data=b"\x00", headers={"Content-Encoding": "br"})
    await assert_refused(hostile, got, 415, None, "unsupported Content-Encoding 'br': use gzip, deflate or identity")


def requests_counted(server: Server, model: str, endpoint: str, status: str) -> float:
    labels = f'endpoint="{endpoint}",model="{re.escape(model)}",status="{status}"'  # sorted by name
    found = re.search(rf"^lightspeed_frontend_requests_total{{{labels}}} (\S+)$", server.metrics(), re.MULTILINE)
    return float(found[1]) if found else 0.0


async def test_refused_requests_are_counted(hostile: LoggedServer) -> None:
    """4xx outcomes were never counted: decoding and validation ran outside the counted block."""
    server = hostile.server
    before = [
        requests_counted(server, "unknown", "completions", "400"),
        requests_counted(server, MODEL, "chat_completions", "400"),
        requests_counted(server, "unknown", "chat_completions", "404"),
    ]
    await post(server, COMPL, data=b"{not json")
    await post(server, CHAT, json={"model": MODEL, "messages": HELLO, "temperature": 9})
    await post(server, CHAT, json={"model": "gpt-9", "messages": HELLO})
    after = [
        requests_counted(server, "unknown", "completions", "400"),
        requests_counted(server, MODEL, "chat_completions", "400"),
        requests_counted(server, "unknown", "chat_completions", "404"),
    ]
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1, 1]


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
