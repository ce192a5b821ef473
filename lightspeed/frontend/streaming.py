"""Serve one generation over HTTP: SSE stream or a single JSON body.

A client that disconnects cancels the handler task (the app runs with handler cancellation);
the CancelledError unwinds the pipeline generator, which closes the request-plane stream, which
cancels the request in the worker and frees its KV blocks.

Once headers are out, a stream always ends the same way: any error (its worker lost with no
migration left, the frontend's own drain running out: drain.py) is sent in-band as an OpenAI
error event, then `[DONE]`, then the chunked body is closed properly.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import msgspec
from aiohttp import web

from lightspeed.errors import LightspeedError
from lightspeed.frontend.drain import ActiveStreams, Tracked, next_delta
from lightspeed.frontend.metrics import FrontendMetrics
from lightspeed.frontend.pipeline import Delta, Generation, Pipeline
from lightspeed.frontend.responses import ResponseBuilder

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "Connection": "keep-alive"}
# Which worker served the request (a stream: the one that sent the first token); the same header
# on a request pins a worker.
WORKER_HEADER = "x-worker-instance-id"
_DONE = b"data: [DONE]\n\n"


class _Timer:
    """TTFT / ITL / duration of one request, observed into the metrics as tokens arrive."""

    def __init__(self, metrics: FrontendMetrics, model: str) -> None:
        self._m = metrics
        self._model = model
        self.start = time.perf_counter()
        self._last = 0.0

    def tokens(self, n: int) -> None:
        if n <= 0:
            return
        now = time.perf_counter()
        if self._last == 0.0:
            self._m.ttft.labels(self._model).observe(now - self.start)
        else:
            # n tokens arrived together: spread the gap evenly, as clients measure it.
            gap = (now - self._last) / n
            hist = self._m.itl.labels(self._model)
            for _ in range(n):
                hist.observe(gap)
        self._last = now

    def finish(self, gen: Generation) -> None:
        model = self._model
        self._m.e2e.labels(model).observe(time.perf_counter() - self.start)
        self._m.isl.labels(model).observe(gen.prompt_tokens)
        self._m.osl.labels(model).observe(gen.completion_tokens)
        self._m.cached.labels(model).inc(gen.cached_tokens)


async def serve_stream(
    request: web.Request,
    pipeline: Pipeline,
    builder: ResponseBuilder,
    metrics: FrontendMetrics,
    include_usage: bool,
    streams: ActiveStreams,
) -> web.StreamResponse:
    gen = builder.gen
    timer = _Timer(metrics, builder.model)
    stream = pipeline.stream(gen)
    try:
        with streams.track() as tracked:
            # Pull the first delta before sending headers so routing errors (no workers, ...) can
            # still be reported with a proper status code instead of inside a 200 stream.
            first = await next_delta(stream, tracked)
            resp = web.StreamResponse(headers={**SSE_HEADERS, WORKER_HEADER: gen.worker_id})
            await resp.prepare(request)
            error = await _write_deltas(resp, builder, stream, first, timer, include_usage, tracked)
    finally:
        await stream.aclose()
    if error is not None:  # headers are out: report the error in-band, then end
        await resp.write(b"data: " + _error_json(error) + b"\n\n")
    await resp.write(_DONE)
    await resp.write_eof()
    timer.finish(gen)
    return resp


async def _write_deltas(
    resp: web.StreamResponse,
    builder: ResponseBuilder,
    stream: AsyncIterator[Delta],
    delta: Delta | None,
    timer: _Timer,
    include_usage: bool,
    tracked: Tracked,
) -> LightspeedError | None:
    """Write the stream's chunks; the error that ended it early, if any."""
    try:
        if builder.chat:
            await resp.write(b"data: " + builder.role_chunk() + b"\n\n")
        while delta is not None:
            timer.tokens(len(delta.token_ids))
            await resp.write(b"data: " + builder.delta_chunk(delta) + b"\n\n")
            delta = await next_delta(stream, tracked)
        if include_usage:
            await resp.write(b"data: " + builder.usage_chunk() + b"\n\n")
    except LightspeedError as err:
        return err
    return None


async def serve_whole(
    pipeline: Pipeline, builder: ResponseBuilder, metrics: FrontendMetrics, streams: ActiveStreams
) -> web.Response:
    timer = _Timer(metrics, builder.model)
    stream = pipeline.stream(builder.gen)
    try:
        with streams.track() as tracked:
            while (delta := await next_delta(stream, tracked)) is not None:
                timer.tokens(len(delta.token_ids))
                builder.add(delta)
    finally:
        await stream.aclose()
    timer.finish(builder.gen)
    return web.Response(
        body=builder.final(), content_type="application/json", headers={WORKER_HEADER: builder.gen.worker_id}
    )


def _error_json(err: LightspeedError) -> bytes:
    return msgspec.json.encode(err.to_openai())
