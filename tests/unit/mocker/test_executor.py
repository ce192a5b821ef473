import time

import pytest

from lightspeed.engine.config import EngineConfig
from lightspeed.engine.types import ScheduledSeq, SchedulerOutput
from lightspeed.mocker.executor import MockerExecutor
from lightspeed.protocol import SamplingOptions

CONFIG = EngineConfig(block_size=4, num_gpu_blocks=64, max_model_len=256, max_num_batched_tokens=256)
PREFILL_1000_S = 32.1058589 / 1000  # prefill_ms(1000), no decode phase


def seq(rid: str, n: int, sample: bool, banned: tuple[int, ...] = ()) -> ScheduledSeq:
    return ScheduledSeq(
        request_id=rid,
        token_ids=[5] * n,
        start_pos=0,
        block_ids=[0],
        sample=sample,
        sampling=SamplingOptions(),
        banned_token_ids=banned,
    )


async def test_samples_only_sequences_that_sample() -> None:
    ex = MockerExecutor(CONFIG, speedup_ratio=1e6, vocab_size=100, seed=1)
    out = await ex.execute(
        SchedulerOutput(seqs=[seq("a", 8, False), seq("b", 1, True)], num_prefill_tokens=8, num_decode_tokens=1)
    )
    assert list(out.sampled) == ["b"]
    assert 0 <= out.sampled["b"] < 100


async def test_never_returns_avoided_or_banned_ids() -> None:
    ex = MockerExecutor(CONFIG, speedup_ratio=1e6, vocab_size=5, seed=3, avoid_token_ids={0, 1})
    seen: set[int] = set()
    for _ in range(200):
        out = await ex.execute(SchedulerOutput(seqs=[seq("a", 1, True, banned=(2,))]))
        seen.add(out.sampled["a"])
    assert seen == {3, 4}


async def test_same_seed_same_tokens() -> None:
    outs = []
    for _ in range(2):
        ex = MockerExecutor(CONFIG, speedup_ratio=1e6, vocab_size=1000, seed=42)
        outs.append([(await ex.execute(SchedulerOutput(seqs=[seq("a", 1, True)]))).sampled["a"] for _ in range(5)])
    assert outs[0] == outs[1]


async def test_tokens_leave_after_prefill_and_the_decode_phase_delays_the_next_step() -> None:
    ex = MockerExecutor(CONFIG, speedup_ratio=10.0, seed=0)
    prefill, decode = 32.1058589 / 1000 / 10, 26.31 / 1000 / 10
    started = time.perf_counter()
    await ex.execute(SchedulerOutput(seqs=[seq("a", 1000, True)], num_prefill_tokens=1000, kv_usage=0.5))
    first_token = time.perf_counter() - started
    await ex.execute(SchedulerOutput(seqs=[seq("a", 1, True)], num_decode_tokens=1, kv_usage=0.5))
    second_token = time.perf_counter() - started
    assert ex.modelled_seconds == pytest.approx(prefill + 2 * decode)
    assert prefill * 0.9 <= first_token < prefill + 0.02  # TTFT = prefill, as in Dynamo
    assert prefill + decode * 0.9 <= second_token < prefill + decode + 0.02  # gap = decode


async def test_work_arriving_during_the_decode_phase_waits_for_it() -> None:
    import asyncio

    ex = MockerExecutor(CONFIG, speedup_ratio=1.0, seed=0)
    await ex.execute(SchedulerOutput(seqs=[seq("a", 1, True)], num_decode_tokens=1, kv_usage=0.5))
    await asyncio.sleep(0.010)  # idle 10 ms of the 26.31 ms decode phase
    started = time.perf_counter()
    await ex.execute(SchedulerOutput(seqs=[seq("b", 1000, False)], num_prefill_tokens=1000))
    elapsed = time.perf_counter() - started
    assert 0.0263 - 0.010 + PREFILL_1000_S - 0.004 <= elapsed < 0.0263 + PREFILL_1000_S + 0.008


async def test_tiny_steps_do_not_sleep() -> None:
    ex = MockerExecutor(CONFIG, speedup_ratio=1e7, seed=0)
    started = time.perf_counter()
    for _ in range(2000):
        await ex.execute(SchedulerOutput(seqs=[seq("a", 1, True)], num_decode_tokens=1))
    # 2000 modelled steps of ~0.6 us each: at most a couple of real sleeps.
    assert time.perf_counter() - started < 0.5


def test_vocab_must_leave_ids() -> None:
    with pytest.raises(ValueError):
        MockerExecutor(CONFIG, vocab_size=2, avoid_token_ids={0, 1})


async def test_seeded_requests_are_reproducible_by_position() -> None:
    from lightspeed.engine.config import EngineConfig
    from lightspeed.engine.types import ScheduledSeq, SchedulerOutput
    from lightspeed.mocker.executor import MockerExecutor
    from lightspeed.protocol import SamplingOptions

    cfg = EngineConfig(block_size=4, num_gpu_blocks=64, max_model_len=128)

    def seq(rid: str, seed: int | None, start: int) -> ScheduledSeq:
        return ScheduledSeq(rid, [5], start, [0], True, SamplingOptions(seed=seed), is_prefill=False)

    a = MockerExecutor(cfg, speedup_ratio=1e9, vocab_size=1000, seed=1)
    b = MockerExecutor(cfg, speedup_ratio=1e9, vocab_size=1000, seed=2)
    out_a = await a.execute(SchedulerOutput([seq("x", 7, 10), seq("y", None, 3)]))
    out_b = await b.execute(SchedulerOutput([seq("z", 7, 10)]))
    assert out_a.sampled["x"] == out_b.sampled["z"]  # same seed and position, other worker/batch
    out_c = await b.execute(SchedulerOutput([seq("z", 7, 11)]))
    out_d = await b.execute(SchedulerOutput([seq("z", 8, 10)]))
    assert len({out_a.sampled["x"], out_c.sampled["z"], out_d.sampled["z"]}) == 3


def _busy_wait(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


async def test_back_to_back_bookkeeping_counts_toward_the_step() -> None:
    ex = MockerExecutor(CONFIG, speedup_ratio=1.0, seed=0)
    step = SchedulerOutput(seqs=[seq("a", 1000, False)], num_prefill_tokens=1000)
    await ex.execute(step)
    _busy_wait(0.020)  # update + schedule of a busy engine: no yield to the loop
    started = time.perf_counter()
    await ex.execute(step)
    elapsed = time.perf_counter() - started
    # The step lasts the modelled 32.1 ms from the end of the previous one, not 32.1 ms more.
    assert PREFILL_1000_S - 0.020 - 0.004 <= elapsed < PREFILL_1000_S - 0.020 + 0.008


async def test_step_after_an_idle_wait_lasts_the_whole_model() -> None:
    import asyncio

    ex = MockerExecutor(CONFIG, speedup_ratio=1.0, seed=0)
    step = SchedulerOutput(seqs=[seq("a", 1000, False)], num_prefill_tokens=1000)
    await ex.execute(step)
    await asyncio.sleep(0.020)  # idle: the engine waited for work
    started = time.perf_counter()
    await ex.execute(step)
    assert time.perf_counter() - started >= PREFILL_1000_S * 0.9


async def test_bookkeeping_beyond_the_model_is_not_repaid() -> None:
    ex = MockerExecutor(CONFIG, speedup_ratio=1.0, seed=0)
    small = SchedulerOutput(seqs=[seq("a", 1, True)], num_decode_tokens=1)  # 5.74 ms
    await ex.execute(small)
    _busy_wait(0.015)  # longer than the modelled step: it just runs late
    await ex.execute(small)
    started = time.perf_counter()
    await ex.execute(SchedulerOutput(seqs=[seq("a", 1000, False)], num_prefill_tokens=1000))
    assert time.perf_counter() - started >= PREFILL_1000_S * 0.9


@pytest.mark.parametrize("seeded", [False, True])
async def test_ban_covering_almost_the_vocabulary_ends(seeded: bool) -> None:
    # min_tokens with stop ids covering all but one id: rejection sampling alone would need
    # ~vocab draws per token; the bounded scan finds the one allowed id.
    ex = MockerExecutor(CONFIG, speedup_ratio=1e6, vocab_size=1000, seed=3, avoid_token_ids={0})
    banned = tuple(i for i in range(1000) if i != 777)
    opts = SamplingOptions(seed=11) if seeded else SamplingOptions()
    s = ScheduledSeq("a", [5], 0, [0], True, opts, banned_token_ids=banned)
    out = await ex.execute(SchedulerOutput(seqs=[s]))
    assert out.sampled["a"] == 777


@pytest.mark.parametrize("seeded", [False, True])
async def test_ban_covering_the_whole_vocabulary_does_not_hang(seeded: bool) -> None:
    ex = MockerExecutor(CONFIG, speedup_ratio=1e6, vocab_size=50, seed=3, avoid_token_ids={0, 1})
    opts = SamplingOptions(seed=11) if seeded else SamplingOptions()
    # Everything but the avoided ids banned: an avoided id is the answer, not an endless loop.
    s = ScheduledSeq("a", [5], 0, [0], True, opts, banned_token_ids=tuple(range(2, 50)))
    assert (await ex.execute(SchedulerOutput(seqs=[s]))).sampled["a"] in (0, 1)
    # Everything banned: the ban yields (the request then stops) rather than the worker hanging.
    s = ScheduledSeq("a", [5], 0, [0], True, opts, banned_token_ids=tuple(range(50)))
    assert 0 <= (await ex.execute(SchedulerOutput(seqs=[s]))).sampled["a"] < 50


async def test_an_engine_starved_of_cpu_reports_its_lag() -> None:
    """Wall clock: every step is followed by 2 ms of CPU work the model does not know about
    (another process on the core, heavy bookkeeping); the engine's step clock shows the debt."""
    import asyncio

    from lightspeed.engine.core import EngineCore, StepInfo
    from lightspeed.protocol import PreprocessedRequest, StopConditions

    ex = MockerExecutor(CONFIG, speedup_ratio=100.0, seed=0)  # decode phase ~0.06 ms
    modelled: list[float] = []

    def hog(info: StepInfo) -> None:
        modelled.append(info.modelled_seconds or 0.0)
        _busy_wait(0.002)

    core = EngineCore(CONFIG, ex, on_step=hog)
    task = asyncio.create_task(core.run())
    stop = StopConditions(max_tokens=20, ignore_eos=True)
    stream = core.add_request(PreprocessedRequest(request_id="a", model="m", token_ids=[5] * 8, stop=stop))
    _ = [out async for out in stream]
    lag = core.clock.take_max_lag()  # the current lag is reset once the engine idles
    core.stop()
    await task
    # The wall time of steps 2..20 includes 19 hogs of >= 2 ms; the model gave them ~0.06 ms each.
    assert lag >= 19 * 0.002 - sum(modelled[1:]) - 1e-3
    assert core.clock.reading().modelled_seconds == pytest.approx(sum(modelled))
