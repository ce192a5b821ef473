"""KV hand-off between engines (disaggregation): a prefill engine holds a finished request's
blocks for a transfer; a decode engine admits a request whose KV arrives from elsewhere."""

from __future__ import annotations

import pytest

from lightspeed.engine.config import EngineConfig
from lightspeed.engine.kv_cache_manager import KVCacheManager
from lightspeed.engine.request import Request, RequestStatus
from lightspeed.engine.scheduler import Scheduler
from lightspeed.engine.types import EngineCoreOutput, ModelRunnerOutput
from lightspeed.protocol import FinishReason, PreprocessedRequest, StopConditions

BS = 4


def engine(blocks: int = 16) -> Scheduler:
    cfg = EngineConfig(
        block_size=BS, num_gpu_blocks=blocks, max_num_batched_tokens=64, max_model_len=min(64, blocks * BS), watermark=0
    )
    return Scheduler(cfg, KVCacheManager(blocks, BS))


def request(rid: str, prompt: list[int], max_tokens: int = 4, eos: int = 2) -> Request:
    pre = PreprocessedRequest(rid, "m", prompt, stop=StopConditions(max_tokens=max_tokens), eos_token_ids=[eos])
    return Request(pre, BS, 64)


def step(s: Scheduler, token: int = 1000) -> list[EngineCoreOutput]:
    sched = s.schedule()
    return s.update_from_output(sched, ModelRunnerOutput(sampled={q.request_id: token for q in sched.seqs if q.sample}))


def test_hold_keeps_blocks_until_released() -> None:
    s = engine()
    r = request("p", list(range(10, 20)), max_tokens=1)  # 10 tokens: 2 full blocks + 2
    r.hold_kv = True
    s.add_request(r)
    (out,) = step(s)
    assert out.finish_reason is FinishReason.LENGTH
    assert out.held is not None and len(out.held.block_ids) == 3
    assert out.held.num_tokens == 10 and out.held.block_hashes == r.block_hashes[:2]
    assert s.kv.pool.num_active_blocks == 3 and not s.requests
    s.kv.check_integrity()
    assert s.release_held("p") is True and s.release_held("p") is False
    assert s.kv.pool.num_active_blocks == 0
    s.kv.check_integrity()


def test_hold_is_skipped_when_the_request_really_stopped() -> None:
    s = engine()
    r = request("p", [10, 11, 12, 13, 14], max_tokens=1, eos=2)
    r.hold_kv = True
    s.add_request(r)
    (out,) = step(s, token=2)  # EOS: nothing left to decode, nothing to hold
    assert out.finish_reason is FinishReason.STOP and out.held is None
    assert s.kv.pool.num_active_blocks == 0


def test_prefilled_request_reuses_cached_prefix_and_decodes() -> None:
    s = engine()
    warm = request("warm", [10, 11, 12, 13, 14, 15, 16, 17, 99], max_tokens=1)
    s.add_request(warm)
    step(s)  # caches blocks [10..13], [14..17]
    r = request("d", [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 500], max_tokens=3)  # prompt 10 + first token
    admitted = s.add_prefilled(r, 10)
    assert admitted is not None
    hit, fresh = admitted
    assert hit == 8 and len(fresh) == 1  # 2 cached blocks, 1 fresh block for tokens 8..9
    assert not s.has_unfinished() and s.schedule().is_empty
    assert s.finish_loading("d") is True
    sched = s.schedule()
    (seq,) = sched.seqs
    assert (seq.token_ids, seq.start_pos, seq.is_prefill) == ([500], 10, False)
    assert sched.num_prefill_tokens == 0 and sched.num_decode_tokens == 1
    outs = s.update_from_output(sched, ModelRunnerOutput(sampled={"d": 7}))
    assert outs[0].new_token_ids == [7]
    step(s)
    (last,) = step(s)
    assert last.finish_reason is FinishReason.LENGTH and r.output_token_ids == [7, 1000, 1000]
    assert s.kv.pool.num_active_blocks == 0
    s.kv.check_integrity()


def test_failed_load_prefills_locally() -> None:
    s = engine()
    r = request("d", [10, 11, 12, 13, 14, 15, 500], max_tokens=2)
    assert s.add_prefilled(r, 6) == (0, s.kv.get_block_ids("d"))
    assert s.fail_loading("d") is True and s.kv.pool.num_active_blocks == 0
    sched = s.schedule()
    assert sched.seqs[0].token_ids == [10, 11, 12, 13, 14, 15, 500] and sched.num_prefill_tokens == 7


def test_abort_while_loading_frees_blocks() -> None:
    s = engine()
    r = request("d", [10, 11, 12, 13, 14, 15, 500])
    assert s.add_prefilled(r, 6) is not None
    assert s.abort_request("d") is True and r.status is RequestStatus.FINISHED_ABORTED
    assert s.finish_loading("d") is False and s.kv.pool.num_active_blocks == 0
    s.kv.check_integrity()


def test_no_room_changes_nothing() -> None:
    s = engine(blocks=2)
    r = request("d", list(range(10, 22)) + [500])  # 12 KV tokens: 3 blocks > 2
    assert s.add_prefilled(r, 12) is None
    assert not s.loading and s.kv.pool.num_active_blocks == 0


def test_kv_tokens_must_be_all_but_the_last() -> None:
    s = engine()
    with pytest.raises(ValueError, match="KV tokens"):
        s.add_prefilled(request("d", [10, 11, 12, 13, 14]), 3)
