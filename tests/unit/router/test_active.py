from __future__ import annotations

from lightspeed.router.active import ActiveLoad


def test_add_prefill_done_free() -> None:
    a = ActiveLoad()
    a.add("r1", "w", 100, blocks=2)
    a.add("r2", "w", 50, blocks=1)
    assert (a.get("w").requests, a.get("w").prefill_tokens, a.get("w").blocks) == (2, 150, 3)
    a.prefill_done("r1")
    a.prefill_done("r1")  # idempotent
    assert a.get("w").prefill_tokens == 50
    a.free("r1")
    a.free("r1")  # idempotent
    assert (a.get("w").requests, a.get("w").prefill_tokens, a.get("w").blocks) == (1, 50, 1)


def test_expire_stale_entries() -> None:
    a = ActiveLoad(stale_after=10)
    a.add("old", "w", 5)
    assert a.expire(now=a._entries["old"].started + 5) == 0
    assert a.expire(now=a._entries["old"].started + 11) == 1
    assert a.get("w").requests == 0 and a.total_requests == 0


def test_remove_worker_drops_its_entries() -> None:
    a = ActiveLoad()
    a.add("r1", "w1", 5)
    a.add("r2", "w2", 7)
    a.remove_worker("w1")
    assert a.get("w1").requests == 0 and a.get("w2").requests == 1 and a.total_requests == 1


def test_shared_prefix_blocks_count_once_per_worker() -> None:
    a = ActiveLoad()
    a.add("r1", "w", 10, blocks=4, hashes=[1, 2, 3])
    a.add("r2", "w", 10, blocks=3, hashes=[1, 2])  # shares blocks 1, 2; one partial tail block
    assert a.get("w").blocks == 3 + 1 + 1
    assert a.get("w").new_blocks([1, 2, 3, 4, 5]) == 2
    a.free("r1")
    assert a.get("w").blocks == 2 + 1 and a.get("w").refs == {1: 1, 2: 1}
    a.free("r2")
    assert a.get("w").blocks == 0 and a.get("w").refs == {}


def test_listeners_hear_local_changes_and_mirrors_are_not_echoed() -> None:
    from lightspeed.router.active import LoadChange

    heard: list[LoadChange] = []
    released: list[int] = []
    a = ActiveLoad()
    a.listeners.append(heard.append)
    a.on_release.append(lambda: released.append(1))
    a.add("r1", "w", 7, blocks=2, hashes=[9])
    a.prefill_done("r1")
    a.free("r1")
    assert [c.kind for c in heard] == ["add", "prefill_done", "free"]
    assert heard[0] == LoadChange("add", "r1", "w", 7, (9,), 1)
    mirror = ActiveLoad()
    mirror.apply(heard[0])
    assert (mirror.get("w").requests, mirror.get("w").prefill_tokens, mirror.get("w").blocks) == (1, 7, 2)
    for change in heard[1:]:
        mirror.apply(change)
    assert mirror.total_requests == 0 and len(released) == 2
    a.apply(LoadChange("add", "r9", "w", 1))
    assert len(heard) == 3  # a mirrored change is not re-broadcast


def test_active_overlap_counts_held_blocks_per_worker() -> None:
    a = ActiveLoad()
    a.add("r1", "w1", 0, blocks=3, hashes=[1, 2, 3])
    a.add("r2", "w1", 0, blocks=2, hashes=[1, 2])
    a.add("r3", "w2", 0, blocks=1, hashes=[1])
    assert a.active_overlap([1, 2, 3, 4]) == {"w1": 3, "w2": 1}
    a.free("r1")
    assert a.active_overlap([1, 2, 3, 4]) == {"w1": 2, "w2": 1}
    a.remove_worker("w1")
    assert a.active_overlap([1, 2, 3, 4]) == {"w2": 1}
    a.free("r3")
    assert a.active_overlap([1]) == {} and a._holders == {}


def test_prefill_progress_clock_and_counts() -> None:
    now = [10.0]
    a = ActiveLoad(clock=lambda: now[0])
    a.add("r1", "w", 100, blocks=2)
    now[0] = 11.0
    a.add("r2", "w", 50, blocks=1)  # the queue was not idle: the progress clock stays
    a.add("cached", "w", 0, blocks=1)  # nothing to prefill: not a prefilling request
    load = a.get("w")
    assert (load.prefill_requests, load.decoding_requests, load.prefill_since) == (2, 1, 10.0)
    now[0] = 12.5
    a.prefill_done("r1")  # a first token: the worker just finished a prefill
    assert (load.prefill_tokens, load.prefill_requests, load.decoding_requests, load.prefill_since) == (50, 1, 2, 12.5)
    now[0] = 13.0
    a.free("r2")  # ended before its first token: its prefill leaves the queue too
    assert (load.prefill_tokens, load.prefill_requests, load.decoding_requests, load.prefill_since) == (0, 0, 2, 13.0)
    now[0] = 20.0
    a.add("r3", "w", 10, blocks=1)  # an idle prefill queue restarts the clock
    assert (load.prefill_requests, load.prefill_since) == (1, 20.0)
