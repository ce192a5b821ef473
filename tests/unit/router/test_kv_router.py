from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence

import pytest

from lightspeed.errors import Overloaded
from lightspeed.kv_hashing import compute_block_hashes, compute_seq_hashes
from lightspeed.protocol import KvEvent, KvStored, PerfModel, StoredBlock, WorkerCard
from lightspeed.router.active import ActiveLoad, LoadChange
from lightspeed.router.admission import AdmissionConfig
from lightspeed.router.cost import KvCostConfig
from lightspeed.router.indexer import ApproxIndex, KvIndex
from lightspeed.router.kv_router import KvRouterConfig, KvSelector
from lightspeed.router.selector import RouteRequest, RouterOverrides
from tests.polling import until

BS = 4
A, B, C, D, E, F = ([k * 10 + i for i in range(BS)] for k in range(1, 7))


def card(wid: str, blocks: int = 1000, batched: int = 64, perf: PerfModel | None = None) -> WorkerCard:
    return WorkerCard(
        instance_id=wid,
        model="m",
        address="x:1",
        block_size=BS,
        total_kv_blocks=blocks,
        max_num_batched_tokens=batched,
        perf=perf,
    )


def stored_event(worker: str, event_id: int, *blocks: list[int]) -> KvEvent:
    tokens = [t for blk in blocks for t in blk]
    local = compute_block_hashes(tokens, BS)
    seq = compute_seq_hashes(local)
    return KvEvent(worker, event_id, KvStored([StoredBlock(s, h) for s, h in zip(seq, local)]))


def req(rid: str, *blocks: list[int], extra: int = 0, overrides: RouterOverrides | None = None) -> RouteRequest:
    return RouteRequest(rid, [t for blk in blocks for t in blk] + list(range(900, 900 + extra)), overrides=overrides)


def selector(cfg: KvRouterConfig | None = None) -> KvSelector:
    sel = KvSelector(ActiveLoad(), cfg or KvRouterConfig(seed=0))
    return sel


def seed_constructed(sel: KvSelector) -> None:
    assert isinstance(sel.index, KvIndex)
    for ev in (stored_event("a", 1, A, B), stored_event("a", 2, A, C, D), stored_event("b", 1, A, C, E)):
        assert sel.index.apply(ev)


async def test_longest_cached_prefix_wins() -> None:
    sel = selector()
    seed_constructed(sel)
    decision = await sel.route(req("r", A, C, D, F), [card("a"), card("b")])
    assert decision.card.instance_id == "a"
    assert decision.overlap_blocks == 3 and decision.prefill_tokens == BS and decision.blocks == 4
    assert len(decision.hashes) == 4
    decision = await sel.route(req("r2", A, C, E, F), [card("a"), card("b")])
    assert (decision.card.instance_id, decision.overlap_blocks) == ("b", 3)


async def test_ties_break_randomly_between_equal_workers() -> None:
    sel = selector()
    workers = [card("a"), card("b"), card("c")]
    picks = Counter([(await sel.route(req(f"r{i}", F), workers)).card.instance_id for i in range(300)])
    assert set(picks) == {"a", "b", "c"} and min(picks.values()) > 60


async def test_queued_prefill_outweighs_a_small_cache_hit() -> None:
    sel = selector()
    seed_constructed(sel)
    sel.active.add("busy", "a", prefill_tokens=400, blocks=100)
    decision = await sel.route(req("r", A, C, D, F), [card("a"), card("b")])
    assert decision.card.instance_id == "b"  # a: 401/4 + 101 blocks; b: 8/4 + 4


async def test_overrides_change_the_weight_and_temperature() -> None:
    sel = selector()
    seed_constructed(sel)
    sel.active.add("x", "a", prefill_tokens=0, blocks=3)
    workers = [card("a"), card("b")]
    # Weight 0: only decode blocks count; a has 3 active, so the cache on a is ignored.
    decision = await sel.route(req("r", A, C, D, F, overrides=RouterOverrides(overlap_score_weight=0.0)), workers)
    assert decision.card.instance_id == "b"
    hot = RouterOverrides(temperature=1000.0)  # near-uniform sampling
    picks = Counter(
        [(await sel.route(req(f"t{i}", A, C, D, F, overrides=hot), workers)).card.instance_id for i in range(200)]
    )
    assert set(picks) == {"a", "b"}


async def test_busy_workers_queue_until_load_is_released() -> None:
    cfg = KvRouterConfig(busy_prefill_frac=1.0, admission=AdmissionConfig(max_wait_s=5), seed=0)
    sel = selector(cfg)
    workers = [card("a", batched=8), card("b", batched=8)]
    sel.active.add("p1", "a", prefill_tokens=100)
    sel.active.add("p2", "b", prefill_tokens=100)
    task = asyncio.create_task(sel.route(req("r", A, B), workers))
    await until(lambda: len(sel.queue) == 1, timeout=2, interval=0.001, what="the request queued")
    assert not task.done()
    sel.active.prefill_done("p2")  # b is no longer busy
    decision = await asyncio.wait_for(task, 1)
    assert decision.card.instance_id == "b" and len(sel.queue) == 0


async def test_full_admission_queue_is_a_503() -> None:
    cfg = KvRouterConfig(busy_decode_threshold=0.5, admission=AdmissionConfig(max_size=0), seed=0)
    sel = selector(cfg)
    sel.active.add("p", "a", prefill_tokens=0, blocks=900)
    with pytest.raises(Overloaded):
        await sel.route(req("r", A), [card("a")])


async def test_approximate_mode_remembers_its_own_decisions_until_ttl() -> None:
    now = [0.0]
    sel = KvSelector(ActiveLoad(), KvRouterConfig(seed=0), index=ApproxIndex(10, clock=lambda: now[0]))
    workers = [card("a"), card("b")]
    first = (await sel.route(req("r1", A, B, C), workers)).card.instance_id
    again = await sel.route(req("r2", A, B, D), workers)
    assert again.card.instance_id == first and again.overlap_blocks == 2
    now[0] = 11.0
    assert sel.index.find_matches(again.hashes) == {}


async def test_latency_policy_prefers_the_worker_that_answers_first() -> None:
    slow = PerfModel((0.0, 1.0, 0.0), (0.0, 0.0, 1.0), 1.0, 1.0)  # 1 ms per prefill token
    fast = PerfModel((0.0, 1.0, 0.0), (0.0, 0.0, 1.0), 1.0, 10.0)  # ten times faster
    sel = selector(KvRouterConfig(cost=KvCostConfig(policy="latency"), seed=0))
    seed_constructed(sel)
    # blocks policy would pick a (3 cached blocks); a is 10x slower, so 4 uncached tokens on b win.
    decision = await sel.route(req("r", A, C, D, F), [card("a", perf=slow), card("b", perf=fast)])
    assert decision.card.instance_id == "b"


async def test_latency_policy_counts_prefill_progress_since_the_last_first_token() -> None:
    now = [100.0]
    perf = PerfModel((0.0, 1.0, 0.0), (0.0, 0.0, 1.0), 1.0, 1.0)  # 1 ms per prefill token, 1 ms decode
    sel = KvSelector(ActiveLoad(clock=lambda: now[0]), KvRouterConfig(cost=KvCostConfig(policy="latency"), seed=0))
    workers = [card("a", perf=perf), card("b", perf=perf)]
    sel.active.add("old", "a", 60, blocks=15)  # queued on a at t=100
    now[0] = 100.05
    sel.active.add("new", "b", 50, blocks=13)  # less queued on b, but just now
    # a: 50 ms at 65 ms per full step (64 tokens + 1 ms decode) = 49 tokens done -> 11 + 16 = 27
    # tokens, 27 ms; b: 50 + 16 = 66 tokens = one full chunk + 2 = 66 ms + one 1 ms decode phase.
    # Without the progress a would cost 76 + 1 ms and lose.
    decision = await sel.route(req("r", A, B, C, D), workers)
    assert decision.card.instance_id == "a"


async def test_decision_for_a_pinned_worker_counts_its_overlap() -> None:
    sel = selector()
    seed_constructed(sel)
    decision = sel.decision_for(req("r", A, C, D, F, extra=2), card("b"))
    assert (decision.overlap_blocks, decision.prefill_tokens, decision.blocks) == (2, 2 * BS + 2, 5)


def test_the_configuration_picks_the_index() -> None:
    assert type(selector().index) is KvIndex
    assert type(selector(KvRouterConfig(use_kv_events=False)).index) is ApproxIndex


class RecordingIndex:
    """A `PrefixIndex` that answers fixed overlaps and logs what the selector tells it."""

    def __init__(self, overlaps: dict[str, int]) -> None:
        self.overlaps = overlaps
        self.recorded: list[tuple[str, tuple[int, ...]]] = []
        self.removed: list[str] = []

    def find_matches(self, seq_hashes: Sequence[int]) -> dict[str, int]:
        return dict(self.overlaps)

    def record(self, worker_id: str, seq_hashes: Sequence[int]) -> None:
        self.recorded.append((worker_id, tuple(seq_hashes)))

    def remove_worker(self, worker_id: str) -> None:
        self.removed.append(worker_id)


async def test_the_selector_talks_to_its_index_only_through_the_protocol() -> None:
    index = RecordingIndex({"b": 2})
    sel = KvSelector(ActiveLoad(), KvRouterConfig(seed=0), index=index)
    decision = await sel.route(req("r", A, B, C), [card("a"), card("b")])
    assert (decision.card.instance_id, decision.overlap_blocks) == ("b", 2)
    pinned = sel.decision_for(req("p", A, B), card("a"))
    sel.mirror(LoadChange("add", "x", "c", 4, (7, 8)))
    sel.mirror(LoadChange("free", "x", "c"))  # only an add says where a prompt went
    sel.remove_worker("a")
    assert index.recorded == [("b", decision.hashes), ("a", pinned.hashes), ("c", (7, 8))]
    assert index.removed == ["a"]


async def test_exact_mode_does_not_learn_from_its_own_decisions() -> None:
    sel = selector()
    first = await sel.route(req("r1", A, B, C), [card("a"), card("b")])
    assert sel.index.find_matches(first.hashes) == {}
    sel.mirror(LoadChange("add", "x", "b", 12, first.hashes))
    assert sel.index.find_matches(first.hashes) == {}


async def test_approximate_mode_learns_a_replicas_decisions_and_forgets_removed_workers() -> None:
    sel = selector(KvRouterConfig(use_kv_events=False, seed=0))
    hashes = (await sel.route(req("r1", A, B), [card("a")])).hashes
    sel.mirror(LoadChange("add", "x", "b", 8, hashes))
    assert sel.index.find_matches(hashes) == {"a": 2, "b": 2}
    sel.remove_worker("a")
    assert sel.index.find_matches(hashes) == {"b": 2}
