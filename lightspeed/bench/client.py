"""Streaming OpenAI-compatible client: sends one request and times every chunk.

Works against any server that speaks `/v1/completions` with SSE streaming (Lightspeed, Dynamo,
vLLM, SGLang). The hot path avoids per-line awaits (reads whatever bytes arrived, splits by
hand) and decodes chunk JSON into narrow Structs; timestamps are `time.perf_counter()` taken
when the bytes were read.
"""

from __future__ import annotations

import itertools
import logging
from time import perf_counter

import aiohttp
import msgspec

from lightspeed.bench.sse import (
    DONE,
    SseLineBuffer,
    StreamChunk,
    Usage,
    carries_token,
    decode_chunk,
)
from lightspeed.bench.workload import RequestSpec

logger = logging.getLogger(__name__)

MAX_ERROR_BODY = 500  # enough to read an OpenAI error JSON, bounded so reports stay small


class RequestResult(msgspec.Struct):
    """What one request measured. Times are seconds; `start_s` is relative to the run start."""

    start_s: float
    e2e_s: float
    ttft_s: float | None = None
    itls_s: list[float] = []
    output_tokens: int = 0
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    status: int = 0  # HTTP status; 0 when no response arrived
    error: str | None = None  # a failure reason key: http_503, timeout, connection, ...
    error_detail: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class _StreamOptions(msgspec.Struct, frozen=True):
    include_usage: bool = True


class CompletionBody(msgspec.Struct):
    model: str
    prompt: tuple[int, ...] | str
    max_tokens: int
    ignore_eos: bool
    stream: bool = True
    stream_options: _StreamOptions = _StreamOptions()


def completions_url(base_url: str, endpoint: str = "/v1/completions") -> str:
    """Join a server base URL (with or without a trailing /v1) and an endpoint path."""
    base = base_url.rstrip("/")
    if base.endswith("/v1") and endpoint.startswith("/v1/"):
        base = base[:-3]
    return base + endpoint


def make_session(concurrency: int, timeout_s: float, keepalive: bool = True) -> aiohttp.ClientSession:
    """One pooled session for the whole run; the pool size matches the request concurrency
    (0 = unbounded) so connections are reused instead of re-opened per request.

    `keepalive=False` opens a fresh connection per request: slower to set up, but immune to
    servers that leave Nagle on (their last small segment then waits for the client's delayed
    ACK, ~40 ms on Linux, on every reused connection)."""
    if keepalive:
        connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=0, keepalive_timeout=60)
    else:
        connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=30)
    return aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False)


async def fetch_models(session: aiohttp.ClientSession, base_url: str) -> list[str]:
    """Model ids listed by the server's /v1/models."""
    async with session.get(completions_url(base_url, "/v1/models")) as resp:
        resp.raise_for_status()
        listing = msgspec.json.decode(await resp.read())
    return [str(entry["id"]) for entry in listing.get("data", [])]


class _StreamState:
    """Mutable per-request accumulator for the stream loop."""

    __slots__ = ("end", "error", "finished", "token_times", "usage")

    def __init__(self) -> None:
        self.token_times: list[float] = []
        self.usage: Usage | None = None
        self.finished = False
        self.end = 0.0
        self.error: str | None = None

    def on_chunk(self, chunk: StreamChunk, now: float) -> None:
        error = chunk.error_text
        if error is not None:
            self.error = error[:MAX_ERROR_BODY]
        if carries_token(chunk):
            self.token_times.append(now)
        if chunk.usage is not None:
            self.usage = chunk.usage
        if any(c.finish_reason is not None for c in chunk.choices):
            self.finished = True


class OpenAIClient:
    """Sends RequestSpecs to one server through a shared aiohttp session."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: str,
        model: str,
        api_key: str | None = None,
        ignore_eos: bool = True,
        session_ids: bool = True,
    ) -> None:
        self._session = session
        self._url = url
        self._model = model
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._encoder = msgspec.json.Encoder()
        # False turns ignore_eos off for every request (natural lengths); True keeps each
        # spec's own setting.
        self._ignore_eos = ignore_eos
        self._session_ids = session_ids
        self.t0 = perf_counter()

    def _body(self, spec: RequestSpec) -> bytes:
        ignore_eos = spec.ignore_eos and self._ignore_eos
        body = CompletionBody(self._model, spec.prompt, spec.max_tokens, ignore_eos)
        return self._encoder.encode(body)

    def _request_headers(self, spec: RequestSpec) -> dict[str, str]:
        if spec.session_id is None or not self._session_ids:
            return self._headers
        return {**self._headers, "x-session-id": spec.session_id}

    async def send(self, spec: RequestSpec) -> RequestResult:
        """Send one streaming request; never raises for server or network failures."""
        body = self._body(spec)
        start = perf_counter()
        try:
            async with self._session.post(self._url, data=body, headers=self._request_headers(spec)) as resp:
                if resp.status != 200:
                    detail = (await resp.read())[:MAX_ERROR_BODY].decode(errors="replace")
                    return self._failure(start, f"http_{resp.status}", detail, resp.status)
                state = await self._read_stream(resp)
                return self._result(spec, start, state)
        except TimeoutError:
            return self._failure(start, "timeout", "request timed out", 0)
        except aiohttp.ClientError as exc:
            return self._failure(start, "connection", f"{type(exc).__name__}: {exc}", 0)
        except msgspec.DecodeError as exc:
            return self._failure(start, "bad_chunk", str(exc), 200)

    async def _read_stream(self, resp: aiohttp.ClientResponse) -> _StreamState:
        state = _StreamState()
        lines = SseLineBuffer()
        # Read to EOF even after [DONE]: leaving the body unread makes aiohttp close the
        # connection instead of returning it to the pool.
        async for data in resp.content.iter_any():
            now = perf_counter()
            for payload in lines.feed(data):
                if payload == DONE:
                    state.end = now
                else:
                    state.on_chunk(decode_chunk(payload), now)
        now = perf_counter()
        for payload in lines.flush():
            if payload == DONE:
                state.end = now
            else:
                state.on_chunk(decode_chunk(payload), now)
        if not state.end:
            state.end = now
        return state

    def _result(self, spec: RequestSpec, start: float, state: _StreamState) -> RequestResult:
        if state.error is not None:
            return self._failure(start, "stream_error", state.error, 200, state.end)
        times = state.token_times
        if not times:
            return self._failure(start, "empty_stream", "no token chunks", 200, state.end)
        if not state.finished and state.usage is None:
            return self._failure(start, "incomplete_stream", "no finish_reason", 200, state.end)
        usage = state.usage
        output = len(times)
        prompt_tokens = spec.prompt_len
        cached = None
        if usage is not None:
            output = usage.completion_tokens if usage.completion_tokens is not None else output
            prompt_tokens = usage.prompt_tokens if usage.prompt_tokens is not None else prompt_tokens
            details = usage.prompt_tokens_details
            cached = details.cached_tokens if details is not None else None
        return RequestResult(
            start_s=start - self.t0,
            e2e_s=state.end - start,
            ttft_s=times[0] - start,
            itls_s=[b - a for a, b in itertools.pairwise(times)],
            output_tokens=output,
            prompt_tokens=prompt_tokens,
            cached_tokens=cached,
            status=200,
        )

    def _failure(self, start: float, reason: str, detail: str, status: int, end: float | None = None) -> RequestResult:
        end = perf_counter() if end is None else end
        logger.debug("request failed: %s %s", reason, detail)
        return RequestResult(
            start_s=start - self.t0,
            e2e_s=end - start,
            status=status,
            error=reason,
            error_detail=detail,
        )
