"""Pipeline: what a migrated stream re-sends, how engine finish reasons reach the client, and
prompts refused by their length before any tokenizing.

The pipeline runs for real (tokenizer, detokenizer, model manager, migration loop); only the push
router is replaced by `ScriptedRouter`, which plays each worker's stream from a script and records
exactly which request each worker was sent, so the continuation arithmetic is checked to the token.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest

from lightspeed.errors import InvalidRequest, LightspeedError, WorkerLost
from lightspeed.frontend.cpu_pool import CpuPool
from lightspeed.frontend.model_manager import ModelManager
from lightspeed.frontend.openai_types import ChatCompletionRequest, ChatMessage, CompletionRequest
from lightspeed.frontend.pipeline import Delta, Generation, Pipeline
from lightspeed.frontend.preprocess import Preprocessor
from lightspeed.protocol import FinishReason, LLMEngineOutput, PreprocessedRequest, WorkerCard
from lightspeed.router.selector import RouteDecision, RouteRequest
from lightspeed.runtime.discovery import MemDiscovery
from tests.polling import until

PROMPT = [1, 504, 2861, 46]  # token ids; any in-vocabulary ids do
OUT = [314, 3096, 2375, 282, 260, 10004, 3066, 1978, 42, 1838, 28, 5343]  # what the "model" says
WORKERS = ("a", "b", "c")  # serving_workers() order: the scripted router takes the first one up

Script = list[LLMEngineOutput | Exception]
_T = TypeVar("_T")


def tokens(ids: Sequence[int], finish: FinishReason | None = None) -> Script:
    """One frame per token; the last frame carries `finish` (None: the stream just stops)."""
    frames: Script = [LLMEngineOutput(token_ids=[t]) for t in ids]
    if finish is not None:
        frames.append(LLMEngineOutput(finish_reason=finish))
    return frames


def dies() -> WorkerLost:
    # No code: the connection dropped mid-stream (not "never started"), so only migration helps.
    return WorkerLost("connection to the worker lost")


@dataclass
class ScriptedRouter:
    """Stands in for `PushRouter`: routes to the first serving worker, streams its script."""

    scripts: dict[str, Script]
    sent: list[tuple[str, PreprocessedRequest]] = field(default_factory=list)
    released: list[str] = field(default_factory=list)

    async def route(self, req: RouteRequest, workers: Sequence[WorkerCard]) -> RouteDecision:
        return RouteDecision(workers[0], len(req.token_ids))

    async def generate(self, decision: RouteDecision, request: PreprocessedRequest) -> AsyncIterator[LLMEngineOutput]:
        worker = decision.card.instance_id
        self.sent.append((worker, request))
        for item in self.scripts[worker]:
            if isinstance(item, Exception):
                raise item
            yield item

    def release(self, request_id: str) -> None:
        self.released.append(request_id)


@pytest.fixture(scope="module")
def tokenizer(smollm_folder: Path) -> Preprocessor:
    return Preprocessor.from_folder(smollm_folder)


@pytest.fixture
async def manager(smollm_folder: Path, tokenizer: Preprocessor) -> AsyncIterator[ModelManager]:
    """A model manager that sees workers a, b and c serving model `m` (the real SmolLM tokenizer)."""
    name = f"test-{uuid.uuid4().hex}"
    workers, manager = MemDiscovery(name), ModelManager(MemDiscovery(name), down_seconds=60)
    manager._tokenizers[str(smollm_folder)] = tokenizer  # loaded once per module, not per test
    await manager.start()
    for wid in WORKERS:
        card = WorkerCard(
            instance_id=wid,
            model="m",
            address="127.0.0.1:1",
            total_kv_blocks=100,
            context_length=4096,
            model_path=str(smollm_folder),
        )
        await workers.register(card)
    await until(lambda: len(manager.all_workers()) == len(WORKERS), timeout=10, what="the workers")
    yield manager
    await manager.stop()


def completion(**fields: object) -> CompletionRequest:
    return CompletionRequest(model="m", prompt=list(PROMPT), **fields)  # type: ignore[arg-type]


async def run(
    manager: ModelManager, router: ScriptedRouter, req: CompletionRequest, migration_limit: int = 1
) -> tuple[Generation, list[Delta]]:
    pipeline = Pipeline(manager, router, migration_limit)  # type: ignore[arg-type]
    gen = await pipeline.prepare(req, "cmpl-test")
    return gen, [d async for d in pipeline.stream(gen)]


def streamed_ids(deltas: list[Delta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


# ------------------------------------------------------------------ migration


@pytest.mark.parametrize(
    ("max_tokens", "min_tokens", "k", "resent_max", "resent_min"),
    [
        (10, 6, 4, 6, 2),  # both budgets shrink by the k tokens already streamed
        (10, 3, 4, 6, 0),  # min_tokens already met: floored at 0, never negative
        (10, 4, 4, 6, 0),  # met exactly
        (10, 0, 1, 9, 0),
        (10, 10, 9, 1, 1),  # one token left, and it is still owed
    ],
)
async def test_a_migrated_stream_resends_prompt_plus_outputs_with_budgets_less_k(
    manager: ModelManager, max_tokens: int, min_tokens: int, k: int, resent_max: int, resent_min: int
) -> None:
    router = ScriptedRouter({"a": [*tokens(OUT[:k]), dies()], "b": tokens(OUT[k:max_tokens], FinishReason.LENGTH)})
    req = completion(
        max_tokens=max_tokens, min_tokens=min_tokens, stop_token_ids=[7], ignore_eos=True, seed=3, temperature=0.5
    )
    gen, deltas = await run(manager, router, req)
    [(first_worker, first), (second_worker, resent)] = router.sent
    assert (first_worker, second_worker) == ("a", "b")  # a was reported down, so b got the rest
    assert first.token_ids == PROMPT
    assert (first.stop.max_tokens, first.stop.min_tokens) == (max_tokens, min_tokens)
    assert resent.token_ids == PROMPT + OUT[:k]
    assert (resent.stop.max_tokens, resent.stop.min_tokens) == (resent_max, resent_min)
    # Everything else about the request travels unchanged.
    assert resent.request_id == first.request_id == "cmpl-test"
    assert resent.sampling == first.sampling and resent.eos_token_ids == first.eos_token_ids
    assert (resent.stop.stop_token_ids, resent.stop.ignore_eos) == ([7], True)
    # The client saw one unbroken stream: every token once, in order, one finish at the end.
    assert streamed_ids(deltas) == OUT[:max_tokens]
    assert [d.finish_reason for d in deltas if d.finish_reason is not None] == ["length"]
    assert deltas[-1].finish_reason == "length"
    assert gen.completion_tokens == max_tokens and gen.prompt_tokens == len(PROMPT)


async def test_each_migration_subtracts_everything_streamed_so_far(manager: ModelManager) -> None:
    router = ScriptedRouter(
        {
            "a": [*tokens(OUT[:3]), dies()],
            "b": [*tokens(OUT[3:5]), dies()],
            "c": tokens(OUT[5:10], FinishReason.LENGTH),
        }
    )
    gen, deltas = await run(manager, router, completion(max_tokens=10, min_tokens=7), migration_limit=2)
    assert [(w, r.stop.max_tokens, r.stop.min_tokens) for w, r in router.sent] == [
        ("a", 10, 7),
        ("b", 7, 4),
        ("c", 5, 2),
    ]
    assert router.sent[2][1].token_ids == PROMPT + OUT[:5]
    assert streamed_ids(deltas) == OUT[:10] and gen.completion_tokens == 10


async def test_a_stream_lost_before_its_first_token_is_resent_unchanged(manager: ModelManager) -> None:
    router = ScriptedRouter({"a": [dies()], "b": tokens(OUT[:5], FinishReason.LENGTH)})
    _, deltas = await run(manager, router, completion(max_tokens=5, min_tokens=2))
    [(_, first), (_, resent)] = router.sent
    assert resent == first  # nothing streamed: same prompt, same budgets
    assert streamed_ids(deltas) == OUT[:5]


async def test_past_the_migration_limit_the_loss_reaches_the_client(manager: ModelManager) -> None:
    router = ScriptedRouter({"a": [*tokens(OUT[:2]), dies()], "b": tokens(OUT[2:5], FinishReason.LENGTH)})
    pipeline = Pipeline(manager, router, migration_limit=0)  # type: ignore[arg-type]
    gen = await pipeline.prepare(completion(max_tokens=5), "cmpl-test")
    received: list[Delta] = []
    with pytest.raises(WorkerLost):
        async for delta in pipeline.stream(gen):
            received.append(delta)
    assert [w for w, _ in router.sent] == ["a"]
    assert streamed_ids(received) == OUT[:2]


# ------------------------------------------------------------------ finish reasons


@pytest.mark.parametrize(
    ("engine", "openai"),
    [
        (FinishReason.STOP, "stop"),
        (FinishReason.LENGTH, "length"),
        # An engine-side abort has no OpenAI value; like Dynamo (Cancelled -> Stop) it is "stop".
        (FinishReason.CANCELLED, "stop"),
    ],
)
async def test_engine_finish_reasons_map_to_openai_values(
    manager: ModelManager, engine: FinishReason, openai: str
) -> None:
    router = ScriptedRouter({"a": tokens(OUT[:3], engine)})
    gen, deltas = await run(manager, router, completion(max_tokens=10))
    assert [d.finish_reason for d in deltas] == [None, None, None, openai]
    assert streamed_ids(deltas) == OUT[:3] and gen.completion_tokens == 3


async def test_a_cancelled_stream_releases_held_back_text_and_is_not_migrated(manager: ModelManager) -> None:
    entry = manager.get("m")
    assert entry is not None
    text = entry.preprocessor.decode(OUT[:3])
    tail = entry.preprocessor.decode(OUT[2:3])
    # The last token's text could start this stop string, so the detokenizer holds it back...
    router = ScriptedRouter({"a": tokens(OUT[:3], FinishReason.CANCELLED), "b": tokens(OUT, FinishReason.LENGTH)})
    gen, deltas = await run(manager, router, completion(max_tokens=10, stop=[tail + "\u2603never"]))
    # ...and the cancel releases it: the client gets all the text, then "stop".
    assert "".join(d.text for d in deltas) == text
    assert deltas[-1].text.endswith(tail) and deltas[-1].finish_reason == "stop"
    assert [w for w, _ in router.sent] == ["a"]  # an ended stream, not a lost worker
    assert not entry.is_down("a") and gen.completion_tokens == 3


async def test_an_engine_error_with_a_message_is_a_400(manager: ModelManager) -> None:
    # What a worker sends when the engine refuses the request (its own limits).
    router = ScriptedRouter({"a": [LLMEngineOutput(finish_reason=FinishReason.ERROR, error="prompt too long")]})
    with pytest.raises(InvalidRequest, match="prompt too long"):
        await run(manager, router, completion(max_tokens=10))


async def test_an_engine_error_without_a_message_is_a_server_error(manager: ModelManager) -> None:
    router = ScriptedRouter({"a": [*tokens(OUT[:2]), LLMEngineOutput(finish_reason=FinishReason.ERROR)]})
    with pytest.raises(LightspeedError) as err:
        await run(manager, router, completion(max_tokens=10))
    assert err.value.status >= 500


# ------------------------------------------------------------------ prompts too long by their length


class CountingPool(CpuPool):
    """A CPU pool that counts the jobs it is given (a refusal by length must not tokenize)."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    async def run(self, size: int, fn: Callable[[], _T]) -> _T:
        self.sizes.append(size)
        return await super().run(size, fn)


async def test_a_text_prompt_too_long_by_its_length_is_refused_without_tokenizing(
    manager: ModelManager, tokenizer: Preprocessor
) -> None:
    pool = CountingPool()
    pipeline = Pipeline(manager, ScriptedRouter({}), cpu=pool)  # type: ignore[arg-type]
    longest = 81  # bytes of SmolLM2's longest token; the workers' context is 4096
    with pytest.raises(InvalidRequest) as refused:
        await pipeline.prepare(CompletionRequest(model="m", prompt="a" * (longest * 4095 + 1)), "cmpl-test")
    assert (refused.value.status, refused.value.code, refused.value.param) == (400, "context_length_exceeded", "prompt")
    assert refused.value.message == (
        "This model's maximum context length is 4096 tokens, but the prompt has at least 4096 tokens."
    )
    assert pool.sizes == []
    # One character less proves nothing: it is tokenized, and refused by its real count.
    text = "a" * (longest * 4095)
    with pytest.raises(InvalidRequest) as counted:
        await pipeline.prepare(CompletionRequest(model="m", prompt=text), "cmpl-test")
    count = len(tokenizer.encode(text))
    assert counted.value.message == (
        f"This model's maximum context length is 4096 tokens, but the prompt has {count} tokens."
    )
    assert pool.sizes == [len(text)]
    pool.shutdown()


async def test_a_chat_too_long_by_its_length_is_refused_after_templating(manager: ModelManager) -> None:
    pool = CountingPool()
    pipeline = Pipeline(manager, ScriptedRouter({}), cpu=pool)  # type: ignore[arg-type]
    messages = [ChatMessage(role="user", content="a" * (81 * 4096))]
    with pytest.raises(InvalidRequest) as refused:
        await pipeline.prepare(ChatCompletionRequest(model="m", messages=messages), "chatcmpl-test")
    assert (refused.value.code, refused.value.param) == ("context_length_exceeded", "messages")
    # The template's system prompt and markup count too.
    assert refused.value.message.endswith("but the prompt has at least 4098 tokens.")
    assert pool.sizes == [81 * 4096 + 32]  # the content and one message's worth of template work
    pool.shutdown()


async def test_a_chat_is_tokenized_in_the_pool_as_the_preprocessor_does(
    manager: ModelManager, tokenizer: Preprocessor
) -> None:
    pool = CountingPool()
    pipeline = Pipeline(manager, ScriptedRouter({}), cpu=pool)  # type: ignore[arg-type]
    messages = [ChatMessage(role="user", content="Hi<|im_end|>")]
    gen = await pipeline.prepare(ChatCompletionRequest(model="m", messages=messages), "chatcmpl-test")
    assert gen.request.token_ids == tokenizer.encode_chat(messages)
    assert gen.request.token_ids.count(2) == 2  # the template's system and user ends; the user's is text
    assert pool.sizes == [len("Hi<|im_end|>") + 32]
    pool.shutdown()
