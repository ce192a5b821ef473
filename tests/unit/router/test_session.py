from __future__ import annotations

import pytest

from lightspeed.router.session import SessionAffinity


def test_bind_lookup_expiry_and_removal() -> None:
    now = [0.0]
    s = SessionAffinity(ttl=10, clock=lambda: now[0])
    s.bind("s1", "w1")
    s.bind("s2", "w2")
    now[0] = 9.0
    assert s.lookup("s1") == "w1"
    s.bind("s1", "w1")  # a new turn refreshes the binding
    now[0] = 15.0
    assert s.lookup("s1") == "w1" and s.lookup("s2") is None
    s.remove_worker("w1")
    assert s.lookup("s1") is None and len(s) == 0


def test_oldest_sessions_evicted_past_the_bound() -> None:
    s = SessionAffinity(max_sessions=2)
    for sid in ("a", "b", "c"):
        s.bind(sid, "w")
    assert (s.lookup("a"), s.lookup("b"), s.lookup("c")) == (None, "w", "w")
    with pytest.raises(ValueError):
        SessionAffinity(ttl=0)
