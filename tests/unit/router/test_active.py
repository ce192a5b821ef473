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
