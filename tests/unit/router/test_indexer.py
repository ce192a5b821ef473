from __future__ import annotations

import math

import msgspec
import pytest

from lightspeed.kv_hashing import compute_block_hashes, compute_seq_hashes
from lightspeed.protocol import KvCleared, KvEvent, KvRemoved, KvStored, StoredBlock
from lightspeed.router import indexer
from lightspeed.router.indexer import ApproxIndex, KvIndex, PrefixIndex

BS = 4
# Token blocks; a path like "ACD" is the prompt A+C+D and its blocks' sequence hashes.
TOKENS = {
    "A": [1, 2, 3, 4],
    "B": [5, 6, 7, 8],
    "C": [9, 10, 11, 12],
    "D": [13, 14, 15, 16],
    "E": [17, 18, 19, 20],
    "F": [21, 22, 23, 24],
}


def tokens(path: str) -> list[int]:
    return [t for name in path for t in TOKENS[name]]


def seq(path: str) -> list[int]:
    return compute_seq_hashes(compute_block_hashes(tokens(path), BS))


def stored(worker: str, event_id: int, path: str) -> KvEvent:
    local = compute_block_hashes(tokens(path), BS)
    blocks = [StoredBlock(s, h) for s, h in zip(seq(path), local, strict=True)]
    return KvEvent(worker, event_id, KvStored(blocks))


def removed(worker: str, event_id: int, *seq_hashes: int) -> KvEvent:
    return KvEvent(worker, event_id, KvRemoved(list(seq_hashes)))


@pytest.fixture
def index() -> KvIndex:
    """Worker a stored [A,B] and [A,C,D]; worker b stored [A,C,E]."""
    idx = KvIndex()
    assert idx.apply(stored("a", 1, "AB"))
    assert idx.apply(stored("a", 2, "ACD"))
    assert idx.apply(stored("b", 1, "ACE"))
    return idx


def snapshot(idx: KvIndex) -> tuple[object, ...]:
    return (
        idx.find_matches(seq("ACDF")),
        idx.find_matches(seq("AB")),
        idx.num_blocks,
        {w: (idx.worker_blocks(w), idx.last_event_id(w)) for w in idx.workers()},
    )


# ---------------------------------------------------------------- KvIndex


def test_constructed_case(index: KvIndex) -> None:
    assert index.find_matches(seq("ACDF")) == {"a": 3, "b": 2}
    assert index.find_matches(seq("AB")) == {"a": 2, "b": 1}
    assert index.find_matches(seq("ACE")) == {"a": 2, "b": 3}
    assert index.num_blocks == 7  # a: A, AB, AC, ACD; b: A, AC, ACE
    assert index.num_unique_blocks == 5
    assert (index.worker_blocks("a"), index.worker_blocks("b")) == (4, 3)
    assert (index.last_event_id("a"), index.last_event_id("b")) == (2, 1)
    assert index.workers() == ["a", "b"]


def test_no_match_and_empty_query(index: KvIndex) -> None:
    assert index.find_matches([]) == {}
    assert index.find_matches(seq("B")) == {}  # B at position 0 is a different prefix
    assert index.find_matches(seq("F")) == {}


def test_stored_is_idempotent(index: KvIndex) -> None:
    assert index.apply(stored("a", 3, "ACD"))
    assert index.num_blocks == 7
    assert index.worker_blocks("a") == 4
    assert index.find_matches(seq("ACDF")) == {"a": 3, "b": 2}


def test_removed_blocks(index: KvIndex) -> None:
    a, ac, _acd = seq("ACD")
    assert index.apply(removed("a", 3, ac))
    # a keeps ACD but lost its parent AC: the prefix walk stops at depth 1 for a.
    assert index.find_matches(seq("ACDF")) == {"a": 1, "b": 2}
    assert index.worker_blocks("a") == 3
    assert index.apply(removed("b", 2, a, 12345))  # unknown hash: no-op
    assert index.find_matches(seq("ACDF")) == {"a": 1}
    assert index.num_blocks == 5
    assert index.num_unique_blocks == 5  # AC still on b, A still on a
    assert index.apply(removed("b", 3, ac))
    assert index.num_unique_blocks == 4
    assert index.find_matches(seq("ACE")) == {"a": 1}


def test_cleared_drops_all_blocks_of_worker(index: KvIndex) -> None:
    assert index.apply(KvEvent("a", 3, KvCleared()))
    assert index.find_matches(seq("ACDF")) == {"b": 2}
    assert index.find_matches(seq("AB")) == {"b": 1}
    assert index.worker_blocks("a") == 0
    assert index.num_blocks == 3
    assert index.last_event_id("a") == 3
    assert index.workers() == ["a", "b"]
    assert index.apply(stored("a", 4, "AB"))
    assert index.find_matches(seq("AB")) == {"a": 2, "b": 1}


def test_gap_is_rejected_and_changes_nothing(index: KvIndex) -> None:
    before = snapshot(index)
    assert index.apply(KvEvent("a", 4, KvCleared())) is False  # last is 2: id 3 is missing
    assert index.apply(stored("b", 3, "F")) is False
    assert snapshot(index) == before
    assert index.last_event_id("a") == 2
    assert index.apply(KvEvent("a", 3, KvCleared())) is True
    assert index.find_matches(seq("ACDF")) == {"b": 2}


def test_stale_duplicate_is_ignored(index: KvIndex) -> None:
    before = snapshot(index)
    a = seq("A")[0]
    assert index.apply(removed("a", 2, a)) is True  # id 2 already applied
    assert index.apply(KvEvent("a", 1, KvCleared())) is True
    assert index.apply(KvEvent("b", 0, KvCleared())) is True
    assert snapshot(index) == before


def test_first_event_must_have_id_1() -> None:
    idx = KvIndex()
    assert idx.apply(stored("c", 2, "AB")) is False
    assert idx.apply(stored("c", 0, "AB")) is False
    assert idx.workers() == []
    assert idx.last_event_id("c") is None
    assert idx.num_blocks == 0
    assert idx.find_matches(seq("AB")) == {}
    assert idx.apply(stored("c", 1, "AB")) is True
    assert idx.find_matches(seq("AB")) == {"c": 2}


def test_apply_dump_replaces_and_resets_last_id(index: KvIndex) -> None:
    assert index.apply(stored("a", 3, "F"))  # a is at event 3 before the resync
    dump = [stored("a", 7, "ACE"), stored("a", 9, "B")]
    index.apply_dump("a", dump)
    assert index.last_event_id("a") == 9
    assert index.worker_blocks("a") == 4  # A, AC, ACE, B
    assert index.find_matches(seq("ACDF")) == {"a": 2, "b": 2}
    assert index.find_matches(seq("F")) == {}
    assert index.find_matches(seq("B")) == {"a": 1}
    assert index.apply(stored("a", 10, "F")) is True
    assert index.apply(stored("a", 12, "AB")) is False


def test_apply_dump_with_explicit_event_id(index: KvIndex) -> None:
    index.apply_dump("a", [stored("a", 3, "AB")], dump_event_id=42)
    assert index.last_event_id("a") == 42
    assert index.find_matches(seq("ACDF")) == {"a": 1, "b": 2}
    index.apply_dump("b", [], dump_event_id=5)
    assert index.last_event_id("b") == 5
    assert index.worker_blocks("b") == 0
    assert index.find_matches(seq("ACDF")) == {"a": 1}
    assert index.apply(stored("b", 5, "ACE")) is True  # stale: ignored
    assert index.worker_blocks("b") == 0
    assert index.apply(stored("b", 6, "ACE")) is True
    assert index.find_matches(seq("ACE")) == {"a": 1, "b": 3}


def test_empty_dump_without_event_id_reanchors_on_next_event() -> None:
    idx = KvIndex()
    idx.apply_dump("w", [])
    assert idx.workers() == ["w"]
    assert idx.last_event_id("w") is None
    assert idx.apply(stored("w", 57, "AB")) is True
    assert idx.last_event_id("w") == 57
    assert idx.apply(stored("w", 59, "C")) is False
    assert idx.find_matches(seq("AB")) == {"w": 2}


def test_apply_dump_of_unknown_worker() -> None:
    idx = KvIndex()
    idx.apply_dump("n", [stored("n", 3, "AB")])
    assert idx.last_event_id("n") == 3
    assert idx.find_matches(seq("AB")) == {"n": 2}


def test_remove_worker(index: KvIndex) -> None:
    assert index.find_matches(seq("ACDF")) == {"a": 3, "b": 2}  # memoizes a's slot name
    index.remove_worker("a")
    assert index.workers() == ["b"]
    assert index.last_event_id("a") is None
    assert index.worker_blocks("a") == 0
    assert index.num_blocks == 3
    assert index.num_unique_blocks == 3
    assert index.find_matches(seq("ACDF")) == {"b": 2}
    index.remove_worker("a")  # unknown: no-op
    index.remove_worker("zzz")
    # A new worker reuses a's slot and must not inherit any of a's blocks.
    assert index.apply(stored("c", 1, "A"))
    assert index.find_matches(seq("ACDF")) == {"b": 2, "c": 1}
    assert index.find_matches(seq("AB")) == {"b": 1, "c": 1}
    # a rejoining starts a new stream at id 1.
    assert index.apply(stored("a", 5, "AB")) is False
    assert index.apply(stored("a", 1, "AB")) is True
    assert index.find_matches(seq("AB")) == {"a": 2, "b": 1, "c": 1}


def test_more_than_64_workers() -> None:
    idx = KvIndex()
    for w in range(100):
        assert idx.apply(stored(f"w{w:03d}", 1, "ABCD"[: 1 + w % 4]))
    matches = idx.find_matches(seq("ABCD"))
    assert matches == {f"w{w:03d}": 1 + w % 4 for w in range(100)}
    assert idx.num_blocks == sum(1 + w % 4 for w in range(100))


def test_repeated_hashes_within_one_event(index: KvIndex) -> None:
    a, ab = seq("AB")
    assert index.apply(KvEvent("c", 1, KvStored([StoredBlock(a, 0), StoredBlock(a, 0)])))
    assert index.worker_blocks("c") == 1
    assert index.apply(removed("a", 3, ab, ab))
    assert index.worker_blocks("a") == 3
    assert index.find_matches(seq("AB")) == {"a": 1, "b": 1, "c": 1}


def test_memo_tables_can_be_cleared_at_any_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(indexer, "_INTERN_LIMIT", 0)
    monkeypatch.setattr(indexer, "_NAMES_CACHE_LIMIT", 0)
    idx = KvIndex()
    for w in range(5):
        assert idx.apply(stored(f"w{w}", 1, "ABCD"[: 1 + w % 4]))
    assert idx.apply(removed("w3", 2, seq("ABCD")[3]))
    expected = {"w0": 1, "w1": 2, "w2": 3, "w3": 3, "w4": 1}
    assert idx.find_matches(seq("ABCD")) == expected
    assert idx.find_matches(seq("ABCD")) == expected


def test_events_decoded_from_msgpack(index: KvIndex) -> None:
    encode = msgspec.msgpack.Encoder().encode
    decoder = msgspec.msgpack.Decoder(KvEvent)
    idx = KvIndex()
    for event in [stored("a", 1, "AB"), stored("a", 2, "ACD"), stored("b", 1, "ACE")]:
        assert idx.apply(decoder.decode(encode(event)))
    assert idx.find_matches(seq("ACDF")) == {"a": 3, "b": 2}


def test_exact_index_ignores_routing_decisions(index: KvIndex) -> None:
    """Only events say what a worker caches: a routed prompt changes nothing."""
    before = snapshot(index)
    index.record("b", seq("ACDF"))
    index.record("new", seq("F"))
    assert snapshot(index) == before
    assert index.find_matches(seq("F")) == {}


# ---------------------------------------------------------------- PrefixIndex


def test_a_routed_prompt_counts_only_in_the_approximate_index() -> None:
    exact: PrefixIndex = KvIndex()
    approx: PrefixIndex = ApproxIndex(ttl=10.0)
    for idx in (exact, approx):
        idx.record("a", seq("AB"))
    assert exact.find_matches(seq("ABC")) == {}
    assert approx.find_matches(seq("ABC")) == {"a": 2}
    for idx in (exact, approx):
        idx.remove_worker("a")
    assert approx.find_matches(seq("ABC")) == {}


# ---------------------------------------------------------------- ApproxIndex


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("ttl", [0.0, -1.0, math.nan])
def test_approx_rejects_bad_ttl(ttl: float) -> None:
    with pytest.raises(ValueError, match="ttl"):
        ApproxIndex(ttl=ttl)


def test_approx_records_and_expires() -> None:
    clock = FakeClock()
    idx = ApproxIndex(ttl=10.0, clock=clock)
    idx.record("a", seq("AB"))
    clock.now = 4.0
    idx.record("b", seq("ACE"))
    assert idx.find_matches(seq("ACDF")) == {"a": 1, "b": 2}
    assert idx.num_blocks == 5
    assert idx.expire(now=9.999) == 0
    assert idx.expire(now=10.0) == 2  # a's A and AB (recorded at t=0)
    assert idx.find_matches(seq("ACDF")) == {"b": 2}
    clock.now = 14.0  # find_matches expires on its own clock
    assert idx.find_matches(seq("ACDF")) == {}
    assert idx.num_blocks == 0
    assert idx.expire() == 0


def test_approx_rerecord_refreshes_expiry() -> None:
    clock = FakeClock()
    idx = ApproxIndex(ttl=10.0, clock=clock)
    idx.record("a", seq("AB"))
    idx.record("b", seq("A"))
    clock.now = 6.0
    idx.record("a", seq("A"))  # refreshes A only; AB still expires at 10
    assert idx.num_blocks == 3
    assert idx.expire(now=10.0) == 2  # a's AB and b's A
    assert idx.find_matches(seq("AB")) == {"a": 1}
    assert idx.expire(now=15.999) == 0
    assert idx.expire(now=16.0) == 1
    assert idx.find_matches(seq("AB")) == {}


def test_approx_remove_worker() -> None:
    clock = FakeClock()
    idx = ApproxIndex(ttl=10.0, clock=clock)
    idx.record("a", seq("ACD"))
    idx.record("b", seq("AC"))
    idx.remove_worker("a")
    assert idx.find_matches(seq("ACD")) == {"b": 2}
    assert idx.num_blocks == 2
    idx.record("c", seq("A"))  # reuses a's slot; a's queued entry must not touch c
    assert idx.expire(now=10.0) == 3  # b's A, AC and c's A, all due at t=10
    assert idx.num_blocks == 0
    idx.remove_worker("zzz")


def test_approx_repeated_hashes_expire_once() -> None:
    clock = FakeClock()
    idx = ApproxIndex(ttl=10.0, clock=clock)
    a = seq("A")[0]
    idx.record("a", [a, a])
    assert idx.num_blocks == 1
    assert idx.expire(now=10.0) == 1
    assert idx.find_matches([a]) == {}


def test_approx_snapshots_recorded_hashes() -> None:
    clock = FakeClock()
    idx = ApproxIndex(ttl=10.0, clock=clock)
    hashes = seq("AB")
    idx.record("a", hashes)
    hashes.clear()  # the caller reusing its list must not change what was recorded
    idx.record("a", [])
    assert idx.find_matches(seq("AB")) == {"a": 2}
    assert idx.expire(now=10.0) == 2
