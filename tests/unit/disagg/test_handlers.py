"""Prefill and decode handlers on real engine cores (mocker executor), with a scripted mover."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import pytest

from lightspeed.disagg.decode import DecodeHandler
from lightspeed.disagg.prefill import PrefillHandler
from lightspeed.engine.config import EngineConfig
from lightspeed.engine.core import EngineCore
from lightspeed.mocker.executor import MockerExecutor
from lightspeed.protocol import KvTransferParams, LLMEngineOutput, PreprocessedRequest, StopConditions
from lightspeed.runtime.request_plane import RequestPlaneClient

BS = 4


class Flaky(Exception):
    def __init__(self, retryable: bool) -> None:
        super().__init__("scripted failure")
        self.retryable = retryable


class ScriptedMover:
    """Fails the first `failures` pulls (retryable or not), then succeeds; records each pull."""

    def __init__(self, failures: int = 0, retryable: bool = True, delay: float = 0.0) -> None:
        self.kv_bytes_per_token = 8
        self.on_released = None
        self.failures, self.retryable, self.delay = failures, retryable, delay
        self.pulls: list[tuple[list[int], list[int]]] = []
        self.offers: list[str] = []
        self.withdrawn: list[str] = []

    async def start(self) -> None:
        pass

    async def offer(self, transfer_id: str, block_ids: Sequence[int], block_hashes: Sequence[int]) -> bytes:
        self.offers.append(transfer_id)
        return b"chan"

    def withdraw(self, transfer_id: str) -> None:
        self.withdrawn.append(transfer_id)

    async def pull(self, params: KvTransferParams, positions: Sequence[int], dest: Sequence[int]) -> None:
        self.pulls.append((list(positions), list(dest)))
        await asyncio.sleep(self.delay)
        if len(self.pulls) <= self.failures:
            raise Flaky(self.retryable)

    async def close(self) -> None:
        pass


class RecordingDecode(DecodeHandler):
    def __init__(self, core: EngineCore, mover: ScriptedMover) -> None:
        super().__init__(core, mover, RequestPlaneClient())
        self.released: list[str] = []

    async def release_remote(self, params: KvTransferParams) -> bool:
        self.released.append(params.transfer_id)
        return True


@pytest.fixture
async def cores() -> AsyncIterator[tuple[EngineCore, EngineCore]]:
    made = []
    for _ in range(2):
        cfg = EngineConfig(block_size=BS, num_gpu_blocks=64, max_model_len=128, max_num_batched_tokens=16)
        made.append(EngineCore(cfg, MockerExecutor(cfg, speedup_ratio=1000.0, vocab_size=500, seed=1)))
    tasks = [asyncio.create_task(c.run()) for c in made]
    yield made[0], made[1]
    for core in made:
        core.stop()
    await asyncio.gather(*tasks)


def request(rid: str, ids: list[int], max_tokens: int = 6, **kw: object) -> PreprocessedRequest:
    return PreprocessedRequest(rid, "m", ids, stop=StopConditions(max_tokens=max_tokens, ignore_eos=True), **kw)  # type: ignore[arg-type]


async def collect(agen: AsyncIterator[LLMEngineOutput]) -> list[LLMEngineOutput]:
    return [out async for out in agen]


async def prefill_leg(core: EngineCore, mover: ScriptedMover, ids: list[int]) -> tuple[PrefillHandler, LLMEngineOutput]:
    handler = PrefillHandler(core, mover, 30.0, "p-1", "127.0.0.1:1")
    leg = request("r-prefill", ids, kv_transfer_params=KvTransferParams(do_remote_decode=True))
    (out,) = await collect(handler.generate(leg))
    return handler, out


def decode_leg(ids: list[int], first: LLMEngineOutput, max_tokens: int = 5) -> PreprocessedRequest:
    return request("r", ids + first.token_ids, max_tokens=max_tokens, kv_transfer_params=first.kv_transfer_params)


async def test_prefill_pins_the_prompt_blocks_until_released(cores: tuple[EngineCore, EngineCore]) -> None:
    core, _ = cores
    mover = ScriptedMover()
    handler, out = await prefill_leg(core, mover, list(range(10, 23)))  # 13 tokens: 3 full blocks + 1
    params = out.kv_transfer_params
    assert params is not None and len(out.token_ids) == 1
    assert (params.num_tokens, params.block_size, len(params.block_ids), len(params.block_hashes)) == (13, BS, 4, 3)
    assert (params.prefill_worker, params.control_address, params.channel) == ("p-1", "127.0.0.1:1", b"chan")
    assert mover.offers == [params.transfer_id] and core.stats().active_blocks == 4
    assert handler.release(params.transfer_id) is True and handler.release(params.transfer_id) is False
    assert mover.withdrawn == [params.transfer_id] and core.stats().active_blocks == 0
    core.kv.check_integrity()


async def test_one_token_request_pins_nothing(cores: tuple[EngineCore, EngineCore]) -> None:
    core, _ = cores
    handler = PrefillHandler(core, ScriptedMover(), 30.0, "p", "a")
    leg = request("r", list(range(10, 20)), max_tokens=1, kv_transfer_params=KvTransferParams(do_remote_decode=True))
    (out,) = await collect(handler.generate(leg))
    assert out.kv_transfer_params is None and out.finish_reason is not None
    assert core.stats().active_blocks == 0 and not handler.held


async def test_decode_pulls_retries_a_corrupt_transfer_and_decodes(cores: tuple[EngineCore, EngineCore]) -> None:
    prefill, decode = cores
    ids = list(range(10, 23))
    _, first = await prefill_leg(prefill, ScriptedMover(), ids)
    mover = ScriptedMover(failures=1, retryable=True)
    handler = RecordingDecode(decode, mover)
    outs = await collect(handler.generate(decode_leg(ids, first)))
    assert sum(len(o.token_ids) for o in outs) == 5 and outs[-1].finish_reason is not None
    assert len(mover.pulls) == 2 and mover.pulls[0][0] == [0, 1, 2, 3]
    assert handler.num_pulled == 1 and handler.num_local_fallbacks == 0
    await asyncio.sleep(0)
    assert first.kv_transfer_params is not None and handler.released == [first.kv_transfer_params.transfer_id]
    assert decode.stats().active_blocks == 0 and decode.stats().cached_blocks >= 3
    decode.kv.check_integrity()


async def test_decode_falls_back_to_a_local_prefill_when_the_pull_keeps_failing(
    cores: tuple[EngineCore, EngineCore],
) -> None:
    prefill, decode = cores
    ids = list(range(30, 45))
    _, first = await prefill_leg(prefill, ScriptedMover(), ids)
    mover = ScriptedMover(failures=99, retryable=True)
    handler = RecordingDecode(decode, mover)
    outs = await collect(handler.generate(decode_leg(ids, first)))
    assert sum(len(o.token_ids) for o in outs) == 5
    assert len(mover.pulls) == handler.pull_attempts and handler.num_local_fallbacks == 1
    assert decode.stats().active_blocks == 0
    decode.kv.check_integrity()


async def test_a_non_retryable_failure_is_not_retried(cores: tuple[EngineCore, EngineCore]) -> None:
    prefill, decode = cores
    ids = list(range(50, 61))
    _, first = await prefill_leg(prefill, ScriptedMover(), ids)
    mover = ScriptedMover(failures=99, retryable=False)
    handler = RecordingDecode(decode, mover)
    await collect(handler.generate(decode_leg(ids, first)))
    assert len(mover.pulls) == 1 and handler.num_local_fallbacks == 1


async def test_only_blocks_missing_on_the_decode_side_are_pulled(cores: tuple[EngineCore, EngineCore]) -> None:
    prefill, decode = cores
    shared = list(range(100, 108))  # 2 full blocks
    await collect(decode.add_request(request("warm", [*shared, 1, 2, 3], max_tokens=1)))  # caches them
    ids = [*shared, *range(200, 209)]  # 17 tokens: 5 blocks, the first 2 cached on the decode side
    _, first = await prefill_leg(prefill, ScriptedMover(), ids)
    mover = ScriptedMover()
    handler = RecordingDecode(decode, mover)
    await collect(handler.generate(decode_leg(ids, first)))
    assert [p[0] for p in mover.pulls] == [[2, 3, 4]] and len(mover.pulls[0][1]) == 3
    assert handler.num_reused_tokens == 8


async def test_hashes_that_do_not_match_the_prompt_are_refused(cores: tuple[EngineCore, EngineCore]) -> None:
    prefill, decode = cores
    ids = list(range(10, 23))
    _, first = await prefill_leg(prefill, ScriptedMover(), ids)
    other = [7, *ids[1:]]  # same length, another first token: other block hashes
    mover = ScriptedMover()
    handler = RecordingDecode(decode, mover)
    outs = await collect(handler.generate(decode_leg(other, first)))
    assert sum(len(o.token_ids) for o in outs) == 5 and mover.pulls == [] and handler.num_local_fallbacks == 1


async def test_other_block_size_is_prefilled_locally(cores: tuple[EngineCore, EngineCore]) -> None:
    _, decode = cores
    params = KvTransferParams(transfer_id="t", block_size=8, num_tokens=10, block_ids=[1, 2])
    mover = ScriptedMover()
    handler = RecordingDecode(decode, mover)
    outs = await collect(handler.generate(request("r", list(range(10, 21)), kv_transfer_params=params)))
    assert sum(len(o.token_ids) for o in outs) == 6 and mover.pulls == [] and handler.num_local_fallbacks == 1


async def test_cancel_during_the_pull_frees_the_blocks_and_releases_the_prefill_side(
    cores: tuple[EngineCore, EngineCore],
) -> None:
    prefill, decode = cores
    ids = list(range(10, 23))
    _, first = await prefill_leg(prefill, ScriptedMover(), ids)
    handler = RecordingDecode(decode, ScriptedMover(delay=10.0))
    task = asyncio.create_task(collect(handler.generate(decode_leg(ids, first))))
    while not decode.scheduler.loading:
        await asyncio.sleep(0.001)
    assert decode.stats().active_blocks == 4
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0)
    assert decode.stats().active_blocks == 0 and not decode.scheduler.loading and len(handler.released) == 1
    decode.kv.check_integrity()
