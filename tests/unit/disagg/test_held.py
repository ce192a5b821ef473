"""Pinned transfers: released once, by the decode side or at the deadline."""

from __future__ import annotations

import pytest

from lightspeed.disagg.held import HeldTransfers


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(timeout: float = 5.0) -> tuple[HeldTransfers, list[tuple[str, str]], Clock]:
    freed: list[tuple[str, str]] = []
    clock = Clock()
    return HeldTransfers(lambda t, r: freed.append((t, r)), timeout, clock), freed, clock


def test_release_frees_once() -> None:
    held, freed, _ = make()
    held.add("t1", "r1", 3)
    assert "t1" in held and len(held) == 1
    assert held.release("t1") is True and held.release("t1") is False
    assert freed == [("t1", "r1")] and held.num_released == 1 and not held


def test_deadline_is_inclusive_and_only_expired_go() -> None:
    held, freed, clock = make(timeout=5.0)
    held.add("old", "r1", 1)
    clock.now += 2.0
    held.add("new", "r2", 1)
    clock.now += 2.999
    assert held.expire() == [] and not freed
    clock.now += 0.001  # exactly 5 s after "old"
    assert held.expire() == ["old"] and freed == [("old", "r1")]
    assert held.num_expired == 1 and list(held._held) == ["new"]


def test_duplicate_and_bad_timeout() -> None:
    held, _, _ = make()
    held.add("t", "r", 1)
    with pytest.raises(ValueError, match="already held"):
        held.add("t", "r", 1)
    with pytest.raises(ValueError, match="kv_transfer_timeout"):
        HeldTransfers(lambda t, r: None, 0)


def test_release_all() -> None:
    held, freed, _ = make()
    held.add("a", "ra", 1)
    held.add("b", "rb", 1)
    held.release_all()
    assert sorted(freed) == [("a", "ra"), ("b", "rb")] and not held
