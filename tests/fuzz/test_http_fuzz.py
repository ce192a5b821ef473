"""Property-based requests against a live `lightspeed serve --engine mocker`.

Bodies are drawn from the request types' own JSON schema (msgspec), then most are made hostile
in one way: some fields swapped for hostile values (huge integers, NaN, deep nesting, wrong
types), an unknown or unsupported field added, or the raw bytes broken (invalid UTF-8, deep
nesting, truncation, gzip). Whatever arrives, the server must answer below 500 with an OpenAI
error body on a 4xx, log no error or traceback, stay up, and keep every worker alive; and
enough requests must get through to the engine for the fuzz to reach past validation.
`derandomize=True` makes each run draw the same cases, so a failure reproduces; each distinct
bug found becomes a regular test in tests/integration/test_bad_input.py.
"""

from __future__ import annotations

import gzip
import http.client
import json
import os
from collections import Counter
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightspeed.frontend.openai_types import ChatCompletionRequest, ChatMessage, CompletionRequest
from lightspeed.frontend.validation import UNSUPPORTED_FIELDS
from tests.integration.conftest import MODEL, Server
from tests.integration.logged_serve import LoggedServer, logged_serve

# Per endpoint; ~10 ms each on 2 cores (both endpoints ~30 s). LIGHTSPEED_FUZZ_EXAMPLES overrides.
EXAMPLES = int(os.environ.get("LIGHTSPEED_FUZZ_EXAMPLES", "1000"))
# Requests that must reach the engine (a 200), as a share of the examples: the schema-drawn
# bodies left clean are mostly valid, so far fewer means valid requests are being refused.
MIN_SERVED = 0.2
OPTIONAL_FIELDS = 4  # at most this many optional fields per object: more would rarely be valid
ALWAYS = {"content"}  # optional in the schema, but a message without it is refused


def from_schema(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values that match a msgspec JSON schema (the subset msgspec emits for our types)."""
    defs: dict[str, Any] = schema.get("$defs", {})

    def strategy(node: dict[str, Any]) -> st.SearchStrategy[Any]:
        if "$ref" in node:
            return st.deferred(lambda: strategy(defs[node["$ref"].rsplit("/", 1)[-1]]))
        if "anyOf" in node:
            return st.one_of([strategy(option) for option in node["anyOf"]])
        if "enum" in node:
            return st.sampled_from(node["enum"])
        kind = node.get("type")
        if kind == "object":
            return objects(node.get("properties", {}), set(node.get("required", [])))
        if kind == "array":
            return st.lists(strategy(node.get("items", {})), max_size=4)
        return SCALARS.get(kind, JSON_VALUES)

    @st.composite
    def objects(draw: st.DrawFn, props: dict[str, Any], required: set[str]) -> dict[str, Any]:
        if not props:  # a free-form mapping (e.g. a content part)
            return draw(st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=3))
        required |= ALWAYS & set(props)
        chosen = draw(st.lists(st.sampled_from(sorted(set(props) - required)), max_size=OPTIONAL_FIELDS, unique=True))
        return {name: draw(FIELD_VALUES.get(name, strategy(props[name]))) for name in sorted(required) + chosen}

    return strategy(schema)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
SCALARS: dict[str | None, st.SearchStrategy[Any]] = {
    "string": st.text(max_size=40),
    "integer": st.integers(min_value=-10, max_value=300) | st.sampled_from([0, 1, 2**31, 2**63 - 1]),
    "number": st.floats(min_value=-5, max_value=5, allow_nan=False),
    "boolean": st.booleans(),
    "null": st.none(),
}


def _schema(kind: type) -> dict[str, Any]:
    schema: dict[str, Any] = msgspec.json.schema(kind)
    return schema


VOCAB = 49152  # SmolLM2's
TEXT = st.text(min_size=1, max_size=40)
TOKEN_IDS = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=20)
TEXT_PART = st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=20)})
# Fields whose schema type says little (`Any`, a bare int): values mostly in range, with edges,
# so that a body left clean usually reaches the engine; the mutations below supply the rest.
FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "prompt": TEXT | TOKEN_IDS | TEXT.map(lambda text: [text]) | TOKEN_IDS.map(lambda ids: [ids]),
    "messages": st.lists(st.deferred(lambda: from_schema(_schema(ChatMessage))), min_size=1, max_size=4),
    "content": TEXT | st.lists(TEXT_PART, min_size=1, max_size=3) | st.none(),
    "n": st.sampled_from([1, 1, 1, 0, 2]),
    "top_k": st.integers(-1, 100),
    "seed": st.integers(-(2**63), 2**64 - 1),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "stop": TEXT | st.lists(TEXT, max_size=4),
    "stop_token_ids": st.lists(st.integers(0, VOCAB - 1), max_size=5),
    "max_tokens": st.integers(1, 64),
    "max_completion_tokens": st.integers(1, 64),
    "min_tokens": st.integers(0, 8),
}


NESTED = st.integers(min_value=60, max_value=3000).map(lambda depth: "[" * depth + "]" * depth)
HOSTILE = st.one_of(
    st.integers(min_value=-(2**80), max_value=2**80),
    st.sampled_from([2**63, 2**64, -(2**63) - 1, 10**30, 0, -1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=50),
    st.booleans(),
    st.none(),
    st.lists(st.integers(min_value=-5, max_value=2**64), max_size=20),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
    NESTED,
)
UNKNOWN_FIELDS = st.sampled_from(sorted(UNSUPPORTED_FIELDS) + ["guided_json", "zzz", "echo", "suffix"])


@st.composite
def bodies(draw: st.DrawFn, kind: type) -> tuple[bytes, dict[str, str]]:
    """A body and its extra headers."""
    body: dict[str, Any] = draw(from_schema(_schema(kind)))
    body["model"] = draw(st.sampled_from([MODEL, MODEL, MODEL, "no-such-model"]))
    mutation = draw(st.sampled_from(["none", "fields", "unknown", "raw"]))
    if mutation == "fields":
        for name in draw(st.lists(st.sampled_from(sorted(body)), min_size=1, max_size=3)):
            body[name] = draw(HOSTILE)
    elif mutation == "unknown":
        body[draw(UNKNOWN_FIELDS)] = draw(HOSTILE)
    raw = _encode(body)
    if mutation == "raw":
        return draw(broken(raw))
    return raw, {}


def _encode(body: dict[str, Any]) -> bytes:
    """JSON, with strings of brackets spliced in as real nesting."""
    raw = json.dumps(body).encode()
    nested = [k for k, v in body.items() if isinstance(v, str) and v.startswith("[[[")]
    for name in nested:
        raw = raw.replace(json.dumps(body[name]).encode(), body[name].encode(), 1)
    return raw


@st.composite
def broken(draw: st.DrawFn, raw: bytes) -> tuple[bytes, dict[str, str]]:
    """The bytes of a good body, broken in one way."""
    how = draw(st.sampled_from(["utf8", "nest", "truncate", "gzip", "bad gzip"]))
    gzipped = {"Content-Encoding": "gzip"}
    if how == "utf8":
        at = draw(st.integers(0, len(raw)))
        return raw[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80"])) + raw[at:], {}
    if how == "nest":
        depth = draw(st.integers(60, 3000))
        return raw[:-1] + b', "x": ' + b"{" * depth + b"}" * depth + b"}", {}
    if how == "truncate":
        return raw[: draw(st.integers(0, len(raw) - 1))], {}
    if how == "gzip":
        return gzip.compress(raw), gzipped
    packed = gzip.compress(raw)
    return packed[: draw(st.integers(0, len(packed) - 1))], gzipped


class Client:
    """One keep-alive connection, reopened when the server closes it."""

    def __init__(self, server: Server) -> None:
        self.host, port = server.url.removeprefix("http://").split(":")
        self.port = int(port)
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=30)

    def post(self, path: str, raw: bytes, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        for attempt in range(2):
            try:
                self.conn.request("POST", path, raw, {"Content-Type": "application/json", **(headers or {})})
                resp = self.conn.getresponse()
                return resp.status, resp.read()
            except (ConnectionError, http.client.HTTPException):
                self.conn.close()
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
                if attempt:
                    raise
        raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[LoggedServer]:
    args = ["--engine", "mocker", "--speedup-ratio", "1000", "--max-model-len", "1024", "--num-gpu-blocks", "512"]
    with logged_serve(args, workers=2) as server:
        yield server


@pytest.fixture(scope="module")
def client(fuzz_server: LoggedServer) -> Client:
    return Client(fuzz_server.server)


def check(status: int, body: bytes, raw: bytes) -> None:
    assert status < 500, f"{status} for {raw[:300]!r}: {body[:300]!r}"
    if status >= 400:
        err = json.loads(body)["error"]
        assert isinstance(err["message"], str) and err["message"], body
        assert isinstance(err["type"], str), body
    else:
        assert body, raw[:300]


def _worker_pids(server: Server) -> list[int]:
    return sorted(w["pid"] for w in server.health()["workers"])


@pytest.mark.parametrize(
    ("path", "kind"), [("/v1/chat/completions", ChatCompletionRequest), ("/v1/completions", CompletionRequest)]
)
def test_no_request_breaks_the_server(fuzz_server: LoggedServer, client: Client, path: str, kind: type) -> None:
    server = fuzz_server.server
    pids = _worker_pids(server)
    statuses: Counter[int] = Counter()

    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )
    @given(case=bodies(kind))
    def run(case: tuple[bytes, dict[str, str]]) -> None:
        raw, headers = case
        status, body = client.post(path, raw, headers)
        statuses[status] += 1
        check(status, body, raw)

    run()
    assert statuses[200] >= MIN_SERVED * sum(statuses.values()), statuses
    good = {"model": MODEL, "prompt": "hello", "max_tokens": 4}
    status, body = client.post("/v1/completions", json.dumps(good).encode())
    assert status == 200, body
    assert _worker_pids(server) == pids  # no worker restarted
    assert fuzz_server.new_error_lines() == []
