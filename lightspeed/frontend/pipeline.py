"""From a validated OpenAI request to a stream of text deltas.

preprocess (template + tokenize in the CPU pool, off the event loop; `validation.check_prompt`
holds the prompt to the model's limits) -> route (choose a worker) -> push (stream engine
outputs) -> detokenize (incremental text, stop strings). Migration re-sends prompt + tokens so
far to another worker when the first one is lost mid-stream, so the client sees one unbroken
stream.

A worker lost at the transport level is reported down to the model manager (kept out of routing
until discovery catches up). A request that never reached its worker (dial failed, worker
draining) is sent to another one without counting as a migration: nothing ran, so a re-send
cannot duplicate work or output. Down workers leave the candidate list, so this ends.
"""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field

import msgspec

from lightspeed.disagg.flow import DisaggFlow
from lightspeed.errors import InvalidRequest, ModelNotFound, Overloaded, WorkerError, WorkerLost
from lightspeed.frontend.cpu_pool import CpuPool
from lightspeed.frontend.detokenize import IncrementalDetokenizer
from lightspeed.frontend.model_manager import ModelEntry, ModelManager
from lightspeed.frontend.openai_types import AnyRequest, ChatCompletionRequest
from lightspeed.frontend.preprocess import Preprocessor
from lightspeed.frontend.validation import check_prompt
from lightspeed.protocol import (
    FinishReason,
    LLMEngineOutput,
    PreprocessedRequest,
    SamplingOptions,
    StopConditions,
    TokenLogprob,
)
from lightspeed.router.push_router import PushRouter
from lightspeed.router.selector import RouteDecision, RouteRequest, RouterOverrides
from lightspeed.runtime.request_plane import CODE_CONNECT_FAILED, CODE_SHUTTING_DOWN

log = logging.getLogger(__name__)

_NEVER_STARTED = frozenset({CODE_CONNECT_FAILED, CODE_SHUTTING_DOWN})
_PER_MESSAGE_CHARS = 32  # what one message costs the chat template, in characters of work


@dataclass(slots=True)
class Delta:
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None


@dataclass
class Generation:
    """One in-flight request: its routing inputs, and its usage counters as it streams."""

    request_id: str
    entry: ModelEntry
    request: PreprocessedRequest
    stop_strings: list[str]
    pinned_worker: str | None = None
    session_id: str | None = None
    overrides: RouterOverrides | None = None
    completion_tokens: int = 0
    cached_tokens: int = 0
    worker_id: str = ""
    output_ids: list[int] = field(default_factory=list)
    pinned_prefill: str | None = None  # a pinned prefill worker (disaggregation)

    @property
    def prompt_tokens(self) -> int:
        return len(self.request.token_ids)


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class Pipeline:
    def __init__(
        self,
        models: ModelManager,
        router: PushRouter,
        migration_limit: int = 0,
        on_migration: Callable[[str], None] | None = None,
        cpu: CpuPool | None = None,
        disagg: DisaggFlow | None = None,
    ) -> None:
        self._models = models
        self._disagg = disagg  # prefill on a prefill worker when the policy says so
        self._router = router
        self._migration_limit = migration_limit
        # Called with the model name each time a stream moves to another worker (metrics).
        self._on_migration = on_migration
        self.cpu = cpu if cpu is not None else CpuPool()  # templating + tokenizing, off the loop

    async def prepare(
        self,
        req: AnyRequest,
        request_id: str,
        pinned: str | None = None,
        session: str | None = None,
        overrides: RouterOverrides | None = None,
    ) -> Generation:
        """Tokenize and build the worker request (raises 4xx: unknown model, prompt over its limits)."""
        entry = self._models.get(req.model)
        if entry is None:
            if not self._models.all_workers():
                raise Overloaded("no workers are available to serve requests")
            raise ModelNotFound(f"The model `{req.model}` does not exist.", param="model")
        token_ids = await self._tokenize(entry, req)
        max_tokens = check_prompt(req, token_ids, entry.preprocessor.vocab_size, entry.context_length)
        eos = list(entry.preprocessor.eos_token_ids)
        preq = PreprocessedRequest(
            request_id=request_id,
            model=entry.name,
            token_ids=token_ids,
            sampling=_sampling(req),
            stop=StopConditions(
                max_tokens=max_tokens,
                stop_token_ids=list(req.stop_token_ids or []),
                ignore_eos=req.ignore_eos,
                min_tokens=req.min_tokens,
            ),
            eos_token_ids=eos,
        )
        pinned_prefill = None
        if self._disagg is not None:
            pinned, pinned_prefill = self._disagg.split_pin(entry.workers, pinned)
        gen = Generation(request_id, entry, preq, req.stop_list, pinned, session, overrides)
        gen.pinned_prefill = pinned_prefill
        return gen

    async def _tokenize(self, entry: ModelEntry, req: AnyRequest) -> list[int]:
        """The prompt's ids, tokenized in the CPU pool; a text whose length alone proves it
        cannot fit the context is refused first, without tokenizing it."""
        if isinstance(req, ChatCompletionRequest):
            job = functools.partial(_tokenize_chat, entry.preprocessor, req, entry.context_length)
            return await self.cpu.run(_chat_size(req), job)
        prompt = req.prompt_value()
        if not isinstance(prompt, str):
            return prompt  # token ids: nothing to do
        _refuse_overlong(req, entry.preprocessor.proves_at_least(prompt, entry.context_length), entry.context_length)
        return await self.cpu.run(len(prompt), functools.partial(entry.preprocessor.encode, prompt))

    async def stream(self, gen: Generation) -> AsyncGenerator[Delta, None]:
        """Yield text deltas; the last one carries the finish reason."""
        detok = IncrementalDetokenizer(gen.entry.preprocessor.tokenizer, stop=gen.stop_strings)
        migrations = 0
        while True:
            try:
                async for delta in self._stream_once(gen, detok):
                    yield delta
                return
            except WorkerLost as err:
                self._models.report_down(gen.worker_id)
                if err.code in _NEVER_STARTED and gen.pinned_worker is None:
                    log.warning(
                        "worker %s did not take %s (%s); sending it elsewhere", gen.worker_id, gen.request_id, err.code
                    )
                    continue
                if migrations >= self._migration_limit or _is_done(gen):
                    raise
                migrations += 1
                if self._on_migration is not None:
                    self._on_migration(gen.entry.name)
                log.warning(
                    "worker %s lost serving %s; migrating (%d/%d)",
                    gen.worker_id,
                    gen.request_id,
                    migrations,
                    self._migration_limit,
                )

    async def _stream_once(self, gen: Generation, detok: IncrementalDetokenizer) -> AsyncGenerator[Delta, None]:
        request = _continuation(gen)
        decision = await self._route(gen, request.token_ids)
        gen.worker_id = decision.card.instance_id
        agen = self._outputs(gen, decision, request)
        try:
            async for out in agen:
                delta = _apply(gen, detok, out)
                if delta is not None:
                    yield delta
                    if delta.finish_reason is not None:
                        return
        finally:
            await agen.aclose()  # a stop string ends the stream early: cancel upstream
            self._router.release(gen.request_id)  # also when the stream never started

    def _outputs(
        self, gen: Generation, decision: RouteDecision, request: PreprocessedRequest
    ) -> AsyncGenerator[LLMEngineOutput, None]:
        """The worker's stream; disaggregated (prefill leg + decode leg) only before any output,
        since a continuation already has its prompt's KV to recompute wherever it lands."""
        if self._disagg is None or gen.output_ids:
            return self._router.generate(decision, request)
        prefill_pool = gen.entry.prefill_workers()
        return self._disagg.outputs(prefill_pool, decision, request, gen.pinned_prefill, gen.overrides)

    async def _route(self, gen: Generation, token_ids: list[int]) -> RouteDecision:
        if gen.pinned_worker is not None and gen.entry.is_down(gen.pinned_worker):
            raise Overloaded(f"worker instance {gen.pinned_worker!r} is not reachable")
        workers = gen.entry.serving_workers()
        if not workers:
            raise Overloaded(f"no workers are serving `{gen.entry.name}`")
        route = RouteRequest(
            gen.request_id, token_ids, gen.pinned_worker, gen.session_id, gen.request.lora_name, gen.overrides
        )
        return await self._router.route(route, workers)


def _apply(gen: Generation, detok: IncrementalDetokenizer, out: LLMEngineOutput) -> Delta | None:
    if out.error is not None:
        raise InvalidRequest(out.error)
    if out.finish_reason is FinishReason.ERROR:
        # The engine failed the step (not the request's fault): a server error, never a
        # normal-looking finish that would pass cut-off output off as complete.
        raise WorkerError(f"the engine failed while generating request {gen.request_id}")
    if out.num_cached_tokens is not None and gen.completion_tokens == 0:
        gen.cached_tokens = out.num_cached_tokens
    gen.output_ids.extend(out.token_ids)
    gen.completion_tokens += len(out.token_ids)
    step = detok.add(out.token_ids)
    text = step.text
    if step.stopped:
        return Delta(text, out.token_ids, FinishReason.STOP.value, out.logprobs)
    finish = out.finish_reason.value if out.finish_reason is not None else None
    if finish is not None:
        text += detok.flush()
        if finish == FinishReason.CANCELLED.value:
            finish = FinishReason.STOP.value
    if not text and finish is None and not out.token_ids:
        return None
    return Delta(text, out.token_ids, finish, out.logprobs)


def _is_done(gen: Generation) -> bool:
    limit = gen.request.stop.max_tokens
    return limit is not None and gen.completion_tokens >= limit


def _continuation(gen: Generation) -> PreprocessedRequest:
    """The request to (re)send: after a migration, prompt + tokens already streamed."""
    if not gen.output_ids:
        return gen.request

    stop = gen.request.stop
    remaining = None if stop.max_tokens is None else stop.max_tokens - len(gen.output_ids)
    return msgspec.structs.replace(
        gen.request,
        token_ids=gen.request.token_ids + gen.output_ids,
        stop=msgspec.structs.replace(
            stop, max_tokens=remaining, min_tokens=max(0, stop.min_tokens - len(gen.output_ids))
        ),
    )


def _tokenize_chat(pre: Preprocessor, req: ChatCompletionRequest, context_length: int) -> list[int]:
    """In a pool thread: render the conversation, bound it by its length, then encode it."""
    prompt = pre.render_chat(req.messages, add_generation_prompt=req.add_generation_prompt)
    _refuse_overlong(req, pre.proves_at_least(prompt.text, context_length), context_length)
    return pre.encode_chat_prompt(prompt)


def _chat_size(req: ChatCompletionRequest) -> int:
    """The work a conversation is, in characters: its text, and a little per message for the
    template's loop over them."""
    size = 0
    for message in req.messages:
        content = message.content
        if isinstance(content, str):
            size += len(content)
        elif content is not None:
            size += sum(len(part.get("text") or "") for part in content)
        size += _PER_MESSAGE_CHARS
    return size


def _refuse_overlong(req: AnyRequest, min_tokens: int | None, context_length: int) -> None:
    """The 400 `check_prompt` would give once tokenized, from a lower bound on the count."""
    if min_tokens is not None:
        raise InvalidRequest(
            f"This model's maximum context length is {context_length} tokens, but the prompt has at least "
            f"{min_tokens} tokens.",
            param="messages" if isinstance(req, ChatCompletionRequest) else "prompt",
            code="context_length_exceeded",
        )


def _sampling(req: AnyRequest) -> SamplingOptions:
    logprobs = req.num_logprobs if isinstance(req, ChatCompletionRequest) else req.logprobs
    return SamplingOptions(
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=None if req.top_k == -1 else req.top_k,
        seed=req.seed,
        logprobs=logprobs,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
    )
