"""HTTP routes of the OpenAI-compatible frontend. Routes only: requests are checked by
`validation`, and the work is in pipeline/streaming.

Every error a client can cause leaves as an OpenAI-style JSON body with a 4xx status; an
unexpected exception is logged and answered with a 500 body, and the server keeps serving.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable

import msgspec
from aiohttp import web

from lightspeed.errors import InvalidRequest, LightspeedError, PayloadTooLarge, RateLimited
from lightspeed.frontend.body import read_body
from lightspeed.frontend.drain import ActiveStreams
from lightspeed.frontend.metrics import FrontendMetrics
from lightspeed.frontend.model_manager import ModelManager
from lightspeed.frontend.openai_types import (
    AnyRequest,
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
)
from lightspeed.frontend.pipeline import Pipeline, new_request_id
from lightspeed.frontend.responses import ResponseBuilder, TokenText
from lightspeed.frontend.streaming import WORKER_HEADER, serve_stream, serve_whole
from lightspeed.frontend.validation import check_engines, decode_request, router_overrides, validate_request

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_chat_decoder = msgspec.json.Decoder(ChatCompletionRequest)
_completion_decoder = msgspec.json.Decoder(CompletionRequest)
PINNED_HEADER = WORKER_HEADER  # on a request: pin it to this worker
SESSION_HEADER = "x-session-id"


def error_response(err: LightspeedError) -> web.Response:
    headers = {}
    if isinstance(err, RateLimited):  # whole seconds, rounded up: waiting that long lets the client in
        headers["Retry-After"] = str(max(1, math.ceil(err.retry_after)))
    return web.Response(
        status=err.status, body=msgspec.json.encode(err.to_openai()), content_type="application/json", headers=headers
    )


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except LightspeedError as err:
        # An expected outcome (a client's mistake, an overload): no ERROR line, no traceback.
        log.debug("%s %s -> %d: %s", request.method, request.path, err.status, err.message)
        return error_response(err)
    except web.HTTPRequestEntityTooLarge as err:
        return error_response(PayloadTooLarge(f"request body is too large: {err.text}"))
    except web.HTTPException as err:
        if err.status < 400:
            raise
        kind = InvalidRequest(err.reason or "bad request")
        kind.status = err.status  # keep aiohttp's status (404, 405, ...) with an OpenAI body
        return error_response(kind)
    except Exception:
        log.exception("unhandled error serving %s %s", request.method, request.path)
        return error_response(LightspeedError("internal server error"))


class FrontendApp:
    """The aiohttp application and the objects its routes use."""

    def __init__(self, models: ModelManager, pipeline: Pipeline, metrics: FrontendMetrics, max_body_bytes: int) -> None:
        self.models = models
        self.pipeline = pipeline
        self.metrics = metrics
        self._token_text: dict[str, TokenText] = {}
        self.streams = ActiveStreams()  # in-flight generations, for the drain on shutdown
        self.max_body_bytes = max_body_bytes
        # Called with (request, prompt + completion tokens) after each generation: the per-key
        # token-rate limit (auth.AuthGate.charge) when API keys are on.
        self.charge_tokens: Callable[[web.Request, int], None] = lambda request, tokens: None
        # Bodies are decompressed by `body.read_body`, bounded by the same limit (not by aiohttp).
        self.app = web.Application(
            client_max_size=max_body_bytes,
            middlewares=[error_middleware],
            handler_args={"auto_decompress": False},
        )
        self.app.add_routes(
            [
                web.post("/v1/chat/completions", self.chat_completions),
                web.post("/v1/completions", self.completions),
                web.get("/v1/models", self.list_models),
                web.get("/health", self.health),
                web.get("/live", self.live),
                web.get("/metrics", self.prometheus),
            ]
        )

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._counted(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._counted(request, chat=False)

    async def _counted(self, request: web.Request, chat: bool) -> web.StreamResponse:
        """Check and serve one request, counting its outcome whatever it is: a refused request
        is counted under its 4xx status like any other."""
        endpoint = "chat_completions" if chat else "completions"
        # Label by model only when it exists: client-chosen names must not grow the metric set.
        model, status = "unknown", "error"
        try:
            body = await read_body(request, self.max_body_bytes)
            req: AnyRequest = decode_request(_chat_decoder, body) if chat else decode_request(_completion_decoder, body)
            entry = self.models.get(req.model)
            if entry is not None:
                model = req.model
            validate_request(req)
            if entry is not None:
                check_engines(req, entry.serving_workers())
            resp = await self._generate(request, req, model, chat)
            status = "success"
            return resp
        except LightspeedError as err:
            status = str(err.status)
            raise
        finally:
            self.metrics.requests.labels(model, endpoint, status).inc()

    async def _generate(self, request: web.Request, req: AnyRequest, model: str, chat: bool) -> web.StreamResponse:
        rid = new_request_id("chatcmpl" if chat else "cmpl")
        self.metrics.inflight.labels(model).inc()
        gen = None
        try:
            gen = await self.pipeline.prepare(
                req,
                rid,
                request.headers.get(PINNED_HEADER),
                request.headers.get(SESSION_HEADER),
                router_overrides(req, request.headers),
            )
            builder = ResponseBuilder(chat, gen, gen.entry.name, self._token_text_for(gen.entry.name))
            if req.stream:
                resp = await serve_stream(
                    request, self.pipeline, builder, self.metrics, req.include_usage, self.streams
                )
            else:
                resp = await serve_whole(self.pipeline, builder, self.metrics, self.streams)
            return resp
        finally:
            self.metrics.inflight.labels(model).dec()
            if gen is not None:  # also a cut or failed stream: its tokens were computed
                self.charge_tokens(request, gen.prompt_tokens + gen.completion_tokens)

    def _token_text_for(self, model: str) -> TokenText:
        tt = self._token_text.get(model)
        if tt is None:
            entry = self.models.get(model)
            assert entry is not None
            tt = self._token_text[model] = TokenText(entry.preprocessor.tokenizer)
        return tt

    async def list_models(self, request: web.Request) -> web.Response:
        cards = [ModelCard(m.name, m.created) for m in self.models.models()]
        return web.Response(body=msgspec.json.encode(ModelList(cards)), content_type="application/json")

    async def health(self, request: web.Request) -> web.Response:
        """Every registered worker with a `healthy` flag (false: reported down after a failed
        dial or a dropped connection). Status: healthy (200) when all are, degraded (200) when
        some are, unhealthy (503) when none is."""
        workers = self.models.all_workers()
        healthy = {w.instance_id: self.models.is_healthy(w.instance_id) for w in workers}
        num_healthy = sum(healthy.values())
        status = "unhealthy" if num_healthy == 0 else "healthy" if num_healthy == len(workers) else "degraded"
        body = {
            "status": status,
            "models": [m.name for m in self.models.models()],
            "workers": [
                {
                    "instance_id": w.instance_id,
                    "model": w.model,
                    "address": w.address,
                    "role": w.role.value,
                    "pid": w.pid,
                    "healthy": healthy[w.instance_id],
                }
                for w in workers
            ],
        }
        return web.Response(
            status=200 if num_healthy else 503, body=msgspec.json.encode(body), content_type="application/json"
        )

    async def live(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "live"})

    async def prometheus(self, request: web.Request) -> web.Response:
        self.metrics.workers.set(len(self.models.all_workers()))
        return web.Response(body=self.metrics.render(), content_type="text/plain", charset="utf-8")
