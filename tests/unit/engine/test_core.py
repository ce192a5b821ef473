import asyncio
import random
from collections.abc import AsyncIterator

import pytest

from lightspeed.engine.config import EngineConfig
from lightspeed.engine.core import EngineCore, StepInfo
from lightspeed.engine.types import EngineCoreOutput, ModelRunnerOutput, SchedulerOutput
from lightspeed.mocker.executor import MockerExecutor
from lightspeed.protocol import (
    FinishReason,
    KvCleared,
    KvEventData,
    KvRemoved,
    KvStored,
    PreprocessedRequest,
    StopConditions,
)
from tests.polling import until

SMALL = EngineConfig(block_size=4, num_gpu_blocks=64, max_num_seqs=16, max_num_batched_tokens=64, max_model_len=128)


class CountingExecutor:
    """Token n of every request is 1000 + n; optionally fails or blocks a step."""

    def __init__(self) -> None:
        self.steps = 0
        self.fail_next = False
        self.gate: asyncio.Event | None = None

    async def execute(self, output: SchedulerOutput) -> ModelRunnerOutput:
        self.steps += 1
        if self.gate is not None:
            await self.gate.wait()
        await asyncio.sleep(0)  # a step yields to the loop, as a real executor does
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("boom")
        return ModelRunnerOutput(sampled={s.request_id: 1000 + s.num_output_tokens for s in output.seqs if s.sample})


Engine = tuple[EngineCore, "CountingExecutor"]


def req(rid: str, tokens: list[int], max_tokens: int = 3) -> PreprocessedRequest:
    return PreprocessedRequest(request_id=rid, model="m", token_ids=tokens, stop=StopConditions(max_tokens=max_tokens))


async def collect(stream: AsyncIterator[EngineCoreOutput]) -> list[EngineCoreOutput]:
    return [out async for out in stream]


@pytest.fixture
async def engine() -> AsyncIterator[tuple[EngineCore, CountingExecutor]]:
    executor = CountingExecutor()
    core = EngineCore(SMALL, executor)
    task = asyncio.create_task(core.run())
    yield core, executor
    core.stop()
    await task


async def test_stream_yields_tokens_then_finish(engine: Engine) -> None:
    core, _ = engine
    outs = await collect(core.add_request(req("a", [5, 6, 7, 8, 9], max_tokens=3)))
    assert outs == [
        EngineCoreOutput("a", [1000], num_cached_tokens=0),
        EngineCoreOutput("a", [1001]),
        EngineCoreOutput("a", [1002], finish_reason=FinishReason.LENGTH),
    ]
    assert core.kv.pool.num_active_blocks == 0
    core.kv.check_integrity()


async def test_idle_loop_does_not_step(engine: Engine) -> None:
    core, executor = engine
    await asyncio.sleep(0.02)  # idle time is the point: the loop must not step in it
    assert executor.steps == 0
    await collect(core.add_request(req("a", [5, 6], max_tokens=2)))
    steps = executor.steps
    await asyncio.sleep(0.02)  # idle again after finishing
    assert executor.steps == steps == 2


async def test_prompt_longer_than_max_model_len_rejected_at_add(engine: Engine) -> None:
    core, _ = engine
    with pytest.raises(ValueError):
        core.add_request(req("a", list(range(129))))
    assert core.num_unfinished == 0


async def test_consumer_close_aborts_and_frees_blocks(engine: Engine) -> None:
    core, _ = engine
    stream = core.add_request(req("a", list(range(5, 25)), max_tokens=100))
    first = await stream.__anext__()
    assert first.new_token_ids == [1000]
    await stream.aclose()
    assert core.num_unfinished == 0
    assert core.kv.pool.num_active_blocks == 0
    core.kv.check_integrity()
    with pytest.raises(StopAsyncIteration):
        await stream.__anext__()


async def test_cancelled_consumer_aborts(engine: Engine) -> None:
    core, executor = engine
    executor.gate = asyncio.Event()  # hold the first step so the consumer is parked waiting
    stream = core.add_request(req("a", [5, 6, 7], max_tokens=100))
    consumer = asyncio.create_task(collect(stream))
    await until(lambda: executor.steps == 1, timeout=2, interval=0.001, what="the step held at the gate")
    consumer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await consumer
    assert core.num_unfinished == 0
    executor.gate.set()
    await until(lambda: core.kv.pool.num_active_blocks == 0, timeout=2, interval=0.001, what="blocks freed")
    core.kv.check_integrity()


async def test_abort_ends_stream_with_cancelled(engine: Engine) -> None:
    core, _ = engine
    stream = core.add_request(req("a", [5, 6, 7], max_tokens=100))
    await stream.__anext__()
    assert core.abort("a") is True
    outs = await collect(stream)
    assert outs[-1] == EngineCoreOutput("a", [], finish_reason=FinishReason.CANCELLED)
    assert core.abort("a") is False
    assert core.kv.pool.num_active_blocks == 0


async def test_executor_failure_fails_batch_and_engine_recovers(engine: Engine) -> None:
    core, executor = engine
    executor.fail_next = True
    outs = await collect(core.add_request(req("a", [5, 6, 7])))
    assert outs == [EngineCoreOutput("a", [], finish_reason=FinishReason.ERROR)]
    assert core.kv.pool.num_active_blocks == 0
    outs = await collect(core.add_request(req("b", [5, 6, 7], max_tokens=1)))
    assert outs[-1].finish_reason == FinishReason.LENGTH


async def test_stop_cancels_pending_requests() -> None:
    executor = CountingExecutor()
    executor.gate = asyncio.Event()
    core = EngineCore(SMALL, executor)
    task = asyncio.create_task(core.run())
    stream = core.add_request(req("a", [5, 6, 7], max_tokens=100))
    await until(lambda: executor.steps == 1, timeout=2, interval=0.001, what="the step held at the gate")
    core.stop()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    outs = await collect(stream)
    assert outs == [EngineCoreOutput("a", [], finish_reason=FinishReason.CANCELLED)]
    with pytest.raises(RuntimeError):
        core.add_request(req("b", [1]))


async def test_step_and_kv_event_callbacks() -> None:
    steps: list[StepInfo] = []
    events: list[KvEventData] = []
    core = EngineCore(SMALL, CountingExecutor(), on_kv_events=events.extend, on_step=steps.append)
    task = asyncio.create_task(core.run())
    await collect(core.add_request(req("a", list(range(5, 15)), max_tokens=2)))
    core.stop()
    await task
    assert [(s.num_prefill_tokens, s.num_decode_tokens, s.num_seqs) for s in steps] == [
        (10, 0, 1),
        (0, 1, 1),
    ]
    assert steps[0].kv_usage == 3 / 64
    assert all(s.step_seconds >= 0 for s in steps)
    (stored,) = events
    assert isinstance(stored, KvStored)
    assert stored.parent_hash is None and len(stored.blocks) == 2
    assert core.dump_kv_events() == [stored]
    assert core.reset_prefix_cache() is True
    assert core.take_kv_events() == []
    assert events[-1] == KvCleared()


def replay_index(events: list[KvEventData]) -> set[int]:
    """What a router's index holds after applying the events, checking parents are known."""
    index: set[int] = set()
    for event in events:
        if isinstance(event, KvStored):
            assert event.parent_hash is None or event.parent_hash in index
            index.update(b.block_hash for b in event.blocks)
        elif isinstance(event, KvRemoved):
            assert set(event.block_hashes) <= index
            index.difference_update(event.block_hashes)
        else:
            index.clear()
    return index


async def test_mocker_end_to_end_many_concurrent_requests() -> None:
    config = EngineConfig(
        block_size=16,
        num_gpu_blocks=96,
        max_num_seqs=32,
        max_num_batched_tokens=256,
        max_model_len=512,
    )
    executor = MockerExecutor(config, speedup_ratio=1e6, vocab_size=5000, seed=7, avoid_token_ids={2})
    events: list[KvEventData] = []
    core = EngineCore(config, executor, on_kv_events=events.extend)
    task = asyncio.create_task(core.run())
    rng = random.Random(3)
    shared = [rng.randrange(3, 5000) for _ in range(64)]
    lengths: dict[str, int] = {}
    streams = []
    for i in range(120):
        tail = [rng.randrange(3, 5000) for _ in range(rng.randrange(1, 100))]
        prompt = (shared if i % 2 else []) + tail
        lengths[f"r{i}"] = rng.randrange(1, 40)
        pre = PreprocessedRequest(
            request_id=f"r{i}",
            model="m",
            token_ids=prompt,
            stop=StopConditions(max_tokens=lengths[f"r{i}"]),
            eos_token_ids=[2],
        )
        streams.append(core.add_request(pre))
    results = await asyncio.wait_for(asyncio.gather(*(collect(s) for s in streams)), timeout=30)
    core.stop()
    await task
    for i, outs in enumerate(results):
        tokens = [t for o in outs for t in o.new_token_ids]
        assert len(tokens) == lengths[f"r{i}"]
        assert 2 not in tokens
        assert outs[-1].finish_reason == FinishReason.LENGTH
        assert outs[0].num_cached_tokens is not None
    core.kv.check_integrity()
    pool = core.kv.pool
    assert pool.num_active_blocks == 0
    assert pool.num_free_blocks == config.num_gpu_blocks
    assert core.stats().prefix_hit_rate > 0
    assert core.stats().num_preemptions > 0  # the small cache forces recompute
    assert replay_index(events) == {b.block_hash for e in core.dump_kv_events() for b in e.blocks}
    assert len(replay_index(events)) == pool.num_cached_blocks


async def test_failing_callbacks_do_not_stop_the_engine() -> None:
    def broken(_: object) -> None:
        raise RuntimeError("subscriber down")

    core = EngineCore(SMALL, CountingExecutor(), on_kv_events=broken, on_step=broken)
    task = asyncio.create_task(core.run())
    outs = await collect(core.add_request(req("a", list(range(5, 15)), max_tokens=2)))
    assert outs[-1].finish_reason == FinishReason.LENGTH
    core.stop()
    await task


def test_engine_config_validation() -> None:
    with pytest.raises(ValueError):
        EngineConfig(block_size=0)
    with pytest.raises(ValueError):
        EngineConfig(num_gpu_blocks=10, block_size=16, max_model_len=161)
    with pytest.raises(ValueError):
        EngineConfig(enable_chunked_prefill=False, max_num_batched_tokens=512)
    with pytest.raises(ValueError):
        EngineConfig(watermark=1.0)
    assert EngineConfig(num_gpu_blocks=1000, watermark=0.01).watermark_blocks == 10


async def test_dropped_stream_aborts_request(engine: Engine) -> None:
    core, _ = engine

    async def relay() -> AsyncIterator[EngineCoreOutput]:
        # Like a request-plane handler: `async for` does not close the stream when the
        # handler itself is closed at its `yield`.
        async for out in core.add_request(req("a", [5, 6, 7], max_tokens=1000)):
            yield out

    gen = relay()
    await gen.__anext__()
    assert core.num_unfinished == 1
    await gen.aclose()
    # The loop reaps dropped streams at its next step.
    await until(lambda: core.num_unfinished == 0, timeout=2, interval=0.001, what="the dropped stream reaped")
    assert core.kv.pool.num_active_blocks == 0
    # The id can be reused, and collecting nothing later aborts the new request.
    outs = await collect(core.add_request(req("a", [5, 6, 7], max_tokens=2)))
    assert outs[-1].finish_reason == FinishReason.LENGTH


async def test_unconsumed_dropped_stream_aborts_request(engine: Engine) -> None:
    core, _ = engine
    core.add_request(req("a", [5, 6, 7], max_tokens=1000))
    await until(lambda: core.num_unfinished == 0, timeout=2, interval=0.001, what="the dropped stream reaped")
    assert core.kv.pool.num_active_blocks == 0
