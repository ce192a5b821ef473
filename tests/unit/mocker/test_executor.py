import time

import pytest

from lightspeed.engine.config import EngineConfig
from lightspeed.engine.types import ScheduledSeq, SchedulerOutput
from lightspeed.mocker.executor import MockerExecutor
from lightspeed.protocol import SamplingOptions

CONFIG = EngineConfig(
    block_size=4, num_gpu_blocks=64, max_model_len=256, max_num_batched_tokens=256
)


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
        SchedulerOutput(
            seqs=[seq("a", 8, False), seq("b", 1, True)], num_prefill_tokens=8, num_decode_tokens=1
        )
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
        outs.append(
            [
                (await ex.execute(SchedulerOutput(seqs=[seq("a", 1, True)]))).sampled["a"]
                for _ in range(5)
            ]
        )
    assert outs[0] == outs[1]


async def test_sleeps_the_modelled_time() -> None:
    ex = MockerExecutor(CONFIG, speedup_ratio=10.0, seed=0)
    started = time.perf_counter()
    await ex.execute(
        SchedulerOutput(seqs=[seq("a", 1000, True)], num_prefill_tokens=1000, kv_usage=0.5)
    )
    elapsed = time.perf_counter() - started
    modelled = (32.1058589 + 26.31) / 1000 / 10
    assert ex.modelled_seconds == pytest.approx(modelled)
    assert modelled * 0.9 <= elapsed < modelled + 0.05


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
