import random
from collections.abc import Callable

import pytest

from lightspeed.engine.config import EngineConfig
from lightspeed.engine.kv_cache_manager import KVCacheManager
from lightspeed.engine.request import Request, RequestStatus
from lightspeed.engine.scheduler import Scheduler
from lightspeed.engine.types import (
    EngineCoreOutput,
    ModelRunnerOutput,
    ScheduledSeq,
    SchedulerOutput,
)
from lightspeed.protocol import (
    FinishReason,
    KvEventData,
    KvRemoved,
    KvStored,
    PreprocessedRequest,
    StopConditions,
    StoredBlock,
)

TokenFn = Callable[[ScheduledSeq], int]


def position_token(seq: ScheduledSeq) -> int:
    """Deterministic fake sampler: the n-th output token of every request is 1000 + n."""
    return 1000 + seq.num_output_tokens


class Harness:
    def __init__(self, token_fn: TokenFn = position_token, **overrides: object) -> None:
        params: dict[str, object] = {
            "block_size": 4,
            "num_gpu_blocks": 32,
            "max_num_seqs": 8,
            "max_num_batched_tokens": 64,
            "max_model_len": 64,
            "watermark": 0.0,
        }
        params.update(overrides)
        self.config = EngineConfig(**params)  # type: ignore[arg-type]
        c = self.config
        self.kv = KVCacheManager(c.num_gpu_blocks, c.block_size, c.enable_prefix_caching)
        self.sched = Scheduler(self.config, self.kv)
        self.token_fn = token_fn
        self.streams: dict[str, list[int]] = {}
        self.finish: dict[str, FinishReason] = {}
        self.cached: dict[str, int] = {}

    def add(self, rid: str, prompt: list[int], max_tokens: int = 4, **stop: object) -> Request:
        pre = PreprocessedRequest(
            request_id=rid,
            model="m",
            token_ids=prompt,
            stop=StopConditions(max_tokens=max_tokens, **stop),  # type: ignore[arg-type]
            eos_token_ids=[2],
        )
        c = self.config
        req = Request(pre, c.block_size, c.max_model_len, c.enable_prefix_caching)
        self.sched.add_request(req)
        self.streams[rid] = []
        return req

    def step(self) -> tuple[SchedulerOutput, list[EngineCoreOutput]]:
        out = self.sched.schedule()
        self.kv.check_integrity()
        sampled = {s.request_id: self.token_fn(s) for s in out.seqs if s.sample}
        results = self.sched.update_from_output(out, ModelRunnerOutput(sampled=sampled))
        self.kv.check_integrity()
        for r in results:
            self.streams[r.request_id].extend(r.new_token_ids)
            if r.num_cached_tokens is not None:
                self.cached[r.request_id] = r.num_cached_tokens
            if r.finish_reason is not None:
                self.finish[r.request_id] = r.finish_reason
        return out, results

    def run(self, max_steps: int = 1000) -> int:
        steps = 0
        while self.sched.has_unfinished():
            self.step()
            steps += 1
            assert steps < max_steps
        return steps


def shape(out: SchedulerOutput) -> list[tuple[str, int, int, bool]]:
    return [(s.request_id, s.start_pos, len(s.token_ids), s.sample) for s in out.seqs]


def test_chunked_prefill_splits_by_budget_exactly() -> None:
    h = Harness(max_num_batched_tokens=8)
    h.add("a", list(range(10, 30)), max_tokens=2)
    out, res = h.step()
    assert shape(out) == [("a", 0, 8, False)]
    assert (out.num_prefill_tokens, out.num_decode_tokens) == (8, 0)
    assert res == []
    out, _ = h.step()
    assert shape(out) == [("a", 8, 8, False)]
    out, res = h.step()
    assert shape(out) == [("a", 16, 4, True)]
    assert out.seqs[0].token_ids == list(range(26, 30))
    assert res == [EngineCoreOutput("a", [1000], num_cached_tokens=0)]
    out, res = h.step()
    assert shape(out) == [("a", 20, 1, True)]
    assert (out.num_prefill_tokens, out.num_decode_tokens) == (0, 1)
    assert res == [EngineCoreOutput("a", [1001], finish_reason=FinishReason.LENGTH)]
    assert not h.sched.has_unfinished()
    assert h.kv.pool.num_active_blocks == 0


def test_budget_shared_between_decode_and_new_prefill() -> None:
    h = Harness(max_num_batched_tokens=8)
    h.add("a", [1, 3, 4, 5, 6, 7])
    h.add("b", [11, 12, 13, 14, 15, 16])
    out, _ = h.step()
    assert shape(out) == [("a", 0, 6, True), ("b", 0, 2, False)]
    out, _ = h.step()
    assert shape(out) == [("a", 6, 1, True), ("b", 2, 4, True)]
    assert (out.num_prefill_tokens, out.num_decode_tokens) == (4, 1)
    out, _ = h.step()
    assert shape(out) == [("a", 7, 1, True), ("b", 6, 1, True)]


def test_chunked_prefill_disabled_waits_for_budget() -> None:
    h = Harness(max_num_batched_tokens=64, enable_chunked_prefill=False)
    h.add("a", list(range(3, 63)))  # 60 tokens
    h.add("b", list(range(103, 113)))  # 10 tokens: does not fit in the 4 left
    out, _ = h.step()
    assert shape(out) == [("a", 0, 60, True)]
    out, _ = h.step()
    assert shape(out) == [("a", 60, 1, True), ("b", 0, 10, True)]


def test_max_num_seqs_is_respected() -> None:
    h = Harness(max_num_seqs=2)
    for rid in "abc":
        h.add(rid, [5, 6, 7], max_tokens=2)
    out, _ = h.step()
    assert [s.request_id for s in out.seqs] == ["a", "b"]
    assert h.sched.stats().num_waiting == 1
    out, _ = h.step()
    assert [s.request_id for s in out.seqs] == ["a", "b"]
    out, _ = h.step()
    assert shape(out) == [("c", 0, 3, True)]
    assert out.finished_request_ids == ["a", "b"]
    h.run()
    assert h.streams == {"a": [1000, 1001], "b": [1000, 1001], "c": [1000, 1001]}


def test_prefix_hit_is_reported_and_counted() -> None:
    h = Harness()
    prompt = list(range(3, 13))  # 10 tokens = 2 full blocks + 2
    h.add("a", prompt, max_tokens=1)
    h.run()
    h.add("b", prompt[:8] + [50, 51, 52], max_tokens=2)
    out, _ = h.step()
    assert shape(out) == [("b", 8, 3, True)]
    assert out.num_prefill_tokens == 3
    h.run()
    assert h.cached == {"a": 0, "b": 8}
    assert h.sched.stats().prefix_hit_rate == pytest.approx(8 / 21)


def test_kv_events_in_order_with_parent_hashes() -> None:
    h = Harness(max_num_batched_tokens=4)
    req = h.add("a", list(range(3, 12)), max_tokens=1)  # 9 tokens
    h.step()
    assert h.kv.take_events() == [
        KvStored(blocks=[StoredBlock(req.block_hashes[0], req.local_hashes[0])], parent_hash=None)
    ]
    h.step()
    assert h.kv.take_events() == [
        KvStored(
            blocks=[StoredBlock(req.block_hashes[1], req.local_hashes[1])],
            parent_hash=req.block_hashes[0],
        )
    ]
    h.step()
    assert h.kv.take_events() == []
    assert not h.sched.has_unfinished()


def test_preemption_recomputes_most_recent_request() -> None:
    # 4 blocks of 2 tokens; two requests of 2-token prompts that each grow to 3 blocks.
    h = Harness(block_size=2, num_gpu_blocks=4, max_model_len=8)
    h.add("a", [3, 4], max_tokens=5)
    h.add("b", [5, 6], max_tokens=5)
    for _ in range(3):
        h.step()
    assert h.streams == {"a": [1000, 1001, 1002], "b": [1000, 1001, 1002]}
    out, _ = h.step()  # a needs a third block: b (added last) is preempted
    assert shape(out) == [("a", 4, 1, True)]
    b = h.sched.requests["b"]
    assert b.status == RequestStatus.PREEMPTED
    assert b.num_computed_tokens == 0
    assert b.output_token_ids == [1000, 1001, 1002]
    assert list(h.sched.waiting) == [b]
    assert h.sched.stats().num_preemptions == 1
    h.run()
    assert h.streams == {"a": [1000, 1001, 1002, 1003, 1004], "b": [1000, 1001, 1002, 1003, 1004]}
    assert h.finish == {"a": FinishReason.LENGTH, "b": FinishReason.LENGTH}
    assert h.kv.pool.num_active_blocks == 0


def test_resumed_request_recomputes_prompt_and_outputs() -> None:
    h = Harness(block_size=2, num_gpu_blocks=4, max_model_len=8, enable_prefix_caching=False)
    h.add("a", [3, 4], max_tokens=5)
    h.add("b", [5, 6], max_tokens=5)
    for _ in range(4):
        h.step()
    out, _ = h.step()
    # a keeps decoding; b cannot come back until a frees its blocks.
    assert shape(out) == [("a", 5, 1, True)]
    out, _ = h.step()
    assert shape(out) == [("b", 0, 5, True)]
    assert out.seqs[0].token_ids == [5, 6, 1000, 1001, 1002]
    assert out.num_prefill_tokens == 5


def test_many_requests_under_block_pressure_all_complete() -> None:
    h = Harness(block_size=4, num_gpu_blocks=12, max_model_len=48, max_num_batched_tokens=16)
    for i in range(10):
        h.add(f"r{i}", [3 + i, 4 + i, 5 + i, 6 + i, 7 + i], max_tokens=12)
    h.run(max_steps=5000)
    assert h.sched.stats().num_preemptions > 0
    expected = [1000 + n for n in range(12)]
    assert h.streams == {f"r{i}": expected for i in range(10)}
    assert set(h.finish.values()) == {FinishReason.LENGTH}
    assert h.kv.pool.num_active_blocks == 0
    assert h.kv.pool.num_free_blocks == 12


def test_abort_frees_blocks_and_is_reported() -> None:
    h = Harness()
    h.add("a", list(range(3, 12)), max_tokens=10)
    h.add("b", [5, 6, 7], max_tokens=10)
    h.step()
    assert h.kv.pool.num_active_blocks == 4
    assert h.sched.abort_request("a")
    assert not h.sched.abort_request("a")
    h.kv.check_integrity()
    assert h.kv.pool.num_active_blocks == 1
    out, _ = h.step()
    assert out.finished_request_ids == ["a"]
    assert [s.request_id for s in out.seqs] == ["b"]


def test_abort_while_step_runs_drops_its_result() -> None:
    h = Harness()
    h.add("a", [5, 6, 7])
    out = h.sched.schedule()
    h.sched.abort_request("a")
    assert h.sched.update_from_output(out, ModelRunnerOutput(sampled={"a": 9})) == []
    h.kv.check_integrity()
    assert h.kv.pool.num_active_blocks == 0


def test_abort_waiting_request() -> None:
    h = Harness(max_num_seqs=1)
    h.add("a", [5, 6, 7])
    h.add("b", [5, 6, 7])
    h.step()
    assert h.sched.abort_request("b")
    assert h.sched.stats().num_waiting == 0


def test_eos_stops_unless_ignored_and_min_tokens_bans_it() -> None:
    eos = lambda seq: 2  # noqa: E731 - the sampler always proposes EOS
    h = Harness(token_fn=eos)
    h.add("plain", [5, 6], max_tokens=5)
    h.add("ignore", [5, 6], max_tokens=3, ignore_eos=True)
    h.run()
    assert h.streams == {"plain": [2], "ignore": [2, 2, 2]}
    assert h.finish == {"plain": FinishReason.STOP, "ignore": FinishReason.LENGTH}

    banned: list[tuple[int, ...]] = []

    def respect_bans(seq: ScheduledSeq) -> int:
        banned.append(seq.banned_token_ids)
        return 7 if 2 in seq.banned_token_ids else 2

    h = Harness(token_fn=respect_bans)
    h.add("min", [5, 6], max_tokens=5, min_tokens=2, stop_token_ids=[9])
    h.run()
    assert banned == [(2, 9), (2, 9), ()]
    assert h.streams["min"] == [7, 7, 2]
    assert h.finish["min"] == FinishReason.STOP


def test_stop_token_id_and_max_model_len() -> None:
    h = Harness(token_fn=lambda seq: 9, max_model_len=8)
    h.add("stop", [5, 6], max_tokens=5, stop_token_ids=[9])
    h.add("long", list(range(3, 9)), max_tokens=50, ignore_eos=True)
    h.run()
    assert h.finish["stop"] == FinishReason.STOP
    h2 = Harness(token_fn=position_token, max_model_len=8)
    h2.add("long", list(range(3, 9)), max_tokens=50)
    h2.run()
    assert h2.streams["long"] == [1000, 1001]
    assert h2.finish["long"] == FinishReason.LENGTH


def test_kv_usage_and_stats() -> None:
    h = Harness(num_gpu_blocks=8, max_model_len=32)
    h.add("a", list(range(3, 12)), max_tokens=3)
    out, _ = h.step()
    assert out.kv_usage == 3 / 8
    stats = h.sched.stats()
    assert (stats.num_running, stats.num_waiting, stats.active_blocks) == (1, 0, 3)
    assert (stats.total_blocks, stats.cached_blocks, stats.kv_usage) == (8, 2, 3 / 8)


def test_duplicate_request_id_rejected() -> None:
    h = Harness()
    h.add("a", [5])
    with pytest.raises(ValueError):
        h.add("a", [6])


def test_resumed_request_reuses_its_own_cached_prefix() -> None:
    h = Harness(block_size=2, num_gpu_blocks=4, max_model_len=8)
    h.add("a", [3, 4], max_tokens=5)
    h.add("b", [5, 6], max_tokens=5)
    for _ in range(5):
        h.step()
    out, _ = h.step()
    # b's prompt block survived in the cache; its evicted output block is recomputed.
    assert shape(out) == [("b", 2, 3, True)]
    assert out.seqs[0].token_ids == [1000, 1001, 1002]
    assert out.num_prefill_tokens == 3
    h.run()
    assert h.cached == {"a": 0, "b": 0}
    assert h.streams["b"] == [1000, 1001, 1002, 1003, 1004]


def test_finished_ids_wait_for_a_step_that_runs() -> None:
    h = Harness()
    h.add("a", [5, 6, 7], max_tokens=10)
    h.step()
    h.sched.abort_request("a")
    out = h.sched.schedule()
    assert out.is_empty and out.finished_request_ids == []
    h.add("b", [8, 9])
    out, _ = h.step()
    assert out.finished_request_ids == ["a"]
    assert [s.request_id for s in out.seqs] == ["b"]


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


def _random_workload(seed: int) -> None:
    rng = random.Random(seed)
    block_size = rng.choice([1, 2, 4, 8])
    num_blocks = rng.randrange(8, 40)
    max_len = min(num_blocks * block_size, 64)
    h = Harness(
        block_size=block_size,
        num_gpu_blocks=num_blocks,
        max_model_len=max_len,
        max_num_batched_tokens=rng.choice([max_len, 8, 16, 64]),
        max_num_seqs=rng.randrange(1, 8),
        watermark=rng.choice([0.0, 0.05]),
        enable_prefix_caching=rng.random() < 0.8,
    )
    prefixes = [[rng.randrange(3, 50) for _ in range(rng.randrange(1, 20))] for _ in range(3)]
    expected: dict[str, int] = {}
    events: list[KvEventData] = []
    for n in range(40):
        prompt = rng.choice(prefixes) if rng.random() < 0.6 else []
        prompt = [*prompt, *(rng.randrange(3, 50) for _ in range(rng.randrange(1, 10)))][:max_len]
        max_tokens = rng.randrange(1, 12)
        h.add(f"r{n}", prompt, max_tokens=max_tokens)
        expected[f"r{n}"] = max(1, min(max_tokens, max_len - len(prompt)))
        if rng.random() < 0.1:
            victim = rng.choice(list(h.sched.requests))
            h.sched.abort_request(victim)
            expected.pop(victim)
        for _ in range(rng.randrange(0, 6)):
            if h.sched.has_unfinished():
                h.step()
        events += h.kv.take_events()
    h.run(max_steps=10000)
    events += h.kv.take_events()
    for rid, count in expected.items():
        assert h.streams[rid] == [1000 + i for i in range(count)], (seed, rid)
    assert h.kv.pool.num_active_blocks == 0
    index = replay_index(events)
    assert index == {b.block_hash for e in h.kv.dump_cached() for b in e.blocks}


def test_random_workloads_keep_invariants() -> None:
    """Preemption, aborts, chunking and shared prefixes in random mixes: every request gets
    exactly its tokens, the pool stays consistent after every step, and replaying the KV
    events yields exactly the cached set with every Stored parent known."""
    for seed in range(80):
        _random_workload(seed)
