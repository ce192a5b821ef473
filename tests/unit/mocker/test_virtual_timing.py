"""Step composition and token timing of a mocker engine on a virtual clock, against hand-computed
model times (Dynamo's polynomials, DESIGN §5). Virtual time moves only in the mocker's sleeps
(and where a test simulates CPU work), so every emission time is exact."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest

from lightspeed.engine.config import EngineConfig
from lightspeed.engine.core import EngineCore, StepInfo
from lightspeed.engine.types import EngineCoreOutput
from lightspeed.mocker.executor import MockerExecutor
from lightspeed.protocol import PreprocessedRequest, StopConditions
from lightspeed.runtime.clock import VirtualClock

CONFIG = EngineConfig(block_size=16, num_gpu_blocks=1000, max_num_batched_tokens=256, max_model_len=4096)


def prefill_s(t: int) -> float:
    return (4.209989e-7 * t * t + 1.518344e-2 * t + 16.50142) / 1000


def decode_s(p: float) -> float:
    return max(1.0, -25.74 * p * p + 54.01 * p + 5.74) / 1000


@dataclass
class Sim:
    core: EngineCore
    clock: VirtualClock
    steps: list[tuple[int, int, float]]  # (prefill tokens, decode tokens, kv usage) per step
    emitted: list[tuple[float, str]]  # (virtual time, request id) per token
    streams: list[object]  # held: a dropped stream aborts its request

    def add(self, rid: str, prompt: int, max_tokens: int) -> None:
        """A prompt of one repeated token per request: no prefix is shared between requests."""
        stop = StopConditions(max_tokens=max_tokens, ignore_eos=True)
        request = PreprocessedRequest(request_id=rid, model="m", token_ids=[ord(rid)] * prompt, stop=stop)
        self.streams.append(self.core.add_request(request))

    def times(self, rid: str) -> list[float]:
        return [t for t, r in self.emitted if r == rid]

    async def until_done(self) -> None:
        while self.core.num_unfinished:
            await asyncio.sleep(0)


@pytest.fixture
async def sim() -> AsyncIterator[Sim]:
    clock = VirtualClock()
    executor = MockerExecutor(CONFIG, speedup_ratio=1.0, seed=0, clock=clock)
    state = Sim(EngineCore(CONFIG, executor, clock=clock), clock, [], [], [])
    dispatch: Callable[[list[EngineCoreOutput]], None] = state.core._dispatch

    def recording_dispatch(outputs: list[EngineCoreOutput]) -> None:
        state.emitted += [(clock.now(), o.request_id) for o in outputs for _ in o.new_token_ids]
        dispatch(outputs)

    def on_step(info: StepInfo) -> None:
        state.steps.append((info.num_prefill_tokens, info.num_decode_tokens, info.kv_usage))

    state.core._dispatch = recording_dispatch  # type: ignore[method-assign]  # timestamps at emission
    state.core.on_step = on_step
    task = asyncio.create_task(state.core.run())
    yield state
    state.core.stop()
    await task


async def test_ttft_is_prefill_and_gaps_are_decode(sim: Sim) -> None:
    sim.add("a", 200, max_tokens=3)
    await sim.until_done()
    p = 13 / 1000  # 200 prompt tokens -> 13 blocks of 16 (up to 202 tokens: still 13)
    assert sim.steps == [(200, 0, p), (0, 1, p), (0, 1, p)]
    t1 = prefill_s(200)  # the first token leaves when the prefill phase ends
    t2 = t1 + decode_s(p)  # the decode phase of step 1 runs after it, then step 2's (empty) prefill
    t3 = t2 + decode_s(p)
    assert sim.times("a") == pytest.approx([t1, t2, t3], abs=1e-12)


async def test_a_chunked_prompt_pays_each_chunk_and_no_decode_until_it_samples(sim: Sim) -> None:
    sim.add("a", 300, max_tokens=1)
    await sim.until_done()
    assert sim.steps == [(256, 0, 16 / 1000), (44, 0, 19 / 1000)]
    assert sim.times("a") == pytest.approx([prefill_s(256) + prefill_s(44)], abs=1e-12)


async def test_mixed_steps_share_the_budget_and_emit_at_prefill_end(sim: Sim) -> None:
    sim.add("a", 100, max_tokens=3)
    sim.add("b", 500, max_tokens=1)
    await sim.until_done()
    # Step 1: a's 100-token prompt + 156 of b's (budget 256). Step 2: a's decode + 255 of b's.
    # Step 3: a's last decode + b's remaining 89, which samples b's only token.
    usage = [(7 + 10) / 1000, (7 + 26) / 1000, (7 + 32) / 1000]
    assert sim.steps == [(256, 0, usage[0]), (255, 1, usage[1]), (89, 1, usage[2])]
    a1 = prefill_s(256)
    a2 = a1 + decode_s(usage[0]) + prefill_s(255)
    a3 = a2 + decode_s(usage[1]) + prefill_s(89)
    assert sim.times("a") == pytest.approx([a1, a2, a3], abs=1e-12)
    assert sim.times("b") == pytest.approx([a3], abs=1e-12)


async def test_bookkeeping_inside_the_decode_phase_is_absorbed_beyond_it_is_lag(sim: Sim) -> None:
    work = [0.004, 0.020]  # simulated CPU time after steps 1 and 2 (decode phase ~6.4 ms)
    lags: list[float] = []

    def busy(info: StepInfo) -> None:
        lags.append(info.lag_seconds)
        sim.clock.advance(work.pop(0) if work else 0.0)

    sim.core.on_step = busy
    sim.add("a", 200, max_tokens=3)
    await sim.until_done()
    d = decode_s(13 / 1000)
    t1 = prefill_s(200)
    t2 = t1 + d  # 4 ms of bookkeeping fit inside the 6.4 ms decode phase: on time
    t3 = t2 + 0.020  # 20 ms did not: the step starts late and emits at once (prefill 0)
    assert sim.times("a") == pytest.approx([t1, t2, t3], abs=1e-12)
    assert lags == pytest.approx([0.0, 0.0, 0.020 - d], abs=1e-12)
    reading = sim.core.clock.reading()
    assert reading.modelled_seconds == pytest.approx(t1 + 2 * d, abs=1e-12)
    assert reading.wall_seconds == pytest.approx(t3, abs=1e-12)
