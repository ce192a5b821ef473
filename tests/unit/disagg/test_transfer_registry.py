"""TransferRegistry: each pinned transfer is released exactly once, never under a pull in flight."""

from __future__ import annotations

import asyncio
import logging

import pytest

from lightspeed.disagg.transfer import CacheSource, TransferRelease
from lightspeed.disagg.transfer_registry import TransferRegistry
from tests.unit.disagg.test_transfer_fixtures import random_cache

SOURCE = CacheSource(random_cache(8), [1, 2, 3])


async def test_verified_pull_releases_and_a_failed_one_does_not() -> None:
    released: list[TransferRelease] = []
    reg = TransferRegistry(timeout_s=60.0, max_pinned=4)
    tid = reg.add(SOURCE, released.append)
    entry = reg.lease(tid)
    assert entry is not None
    reg.end_lease(entry, pulled=False)
    assert (released, len(reg)) == ([], 1)
    entry = reg.lease(tid)
    assert entry is not None
    reg.end_lease(entry, pulled=True)
    assert released == [TransferRelease(tid, "pulled", 3)]
    assert (len(reg), reg.lease(tid), reg.cancel(tid)) == (0, None, False)


async def test_timeout_during_a_pull_waits_for_the_pull_to_end() -> None:
    released: list[TransferRelease] = []
    reg = TransferRegistry(timeout_s=0.05, max_pinned=4)
    tid = reg.add(SOURCE, released.append)
    entry = reg.lease(tid)
    assert entry is not None
    await asyncio.sleep(0.15)
    assert released == []  # the sender may still be reading the blocks
    assert reg.lease(tid) is None  # but no new pull starts
    reg.end_lease(entry, pulled=False)
    assert released == [TransferRelease(tid, "timeout", 3)]


async def test_timeout_during_a_pull_that_succeeds_counts_as_pulled() -> None:
    released: list[TransferRelease] = []
    reg = TransferRegistry(timeout_s=0.05, max_pinned=4)
    tid = reg.add(SOURCE, released.append)
    entry = reg.lease(tid)
    assert entry is not None
    await asyncio.sleep(0.15)
    reg.end_lease(entry, pulled=True)
    assert released == [TransferRelease(tid, "pulled", 3)]


async def test_cancel_during_a_pull_is_deferred_then_released_once() -> None:
    released: list[TransferRelease] = []
    reg = TransferRegistry(timeout_s=0.05, max_pinned=4)
    tid = reg.add(SOURCE, released.append)
    entry = reg.lease(tid)
    assert entry is not None
    assert reg.cancel(tid) is True
    assert reg.cancel(tid) is False
    await asyncio.sleep(0.15)  # the timeout passes too: still one release, with the first reason
    reg.end_lease(entry, pulled=False)
    assert released == [TransferRelease(tid, "cancelled", 3)]


async def test_unpulled_transfer_times_out() -> None:
    released: list[TransferRelease] = []
    reg = TransferRegistry(timeout_s=0.05, max_pinned=4)
    tid = reg.add(SOURCE, released.append)
    await asyncio.sleep(0.15)
    assert (released, len(reg)) == ([TransferRelease(tid, "timeout", 3)], 0)


async def test_release_all_and_a_failing_callback(caplog: pytest.LogCaptureFixture) -> None:
    def boom(_: TransferRelease) -> None:
        raise RuntimeError("owner bug")

    released: list[TransferRelease] = []
    reg = TransferRegistry(timeout_s=60.0, max_pinned=4)
    first = reg.add(SOURCE, boom)
    second = reg.add(SOURCE, released.append)
    third = reg.add(SOURCE, None)
    with caplog.at_level(logging.ERROR):
        reg.release_all()
    assert released == [TransferRelease(second, "shutdown", 3)]
    assert f"KV transfer {first}: release callback failed" in caplog.text
    assert (len(reg), reg.lease(third)) == (0, None)


async def test_ids_are_unguessable_and_bounded() -> None:
    reg = TransferRegistry(timeout_s=60.0, max_pinned=2)
    ids = {reg.add(SOURCE, None), reg.add(SOURCE, None)}
    assert len(ids) == 2
    assert all(len(tid) == 22 for tid in ids)  # 16 random bytes, urlsafe base64
    with pytest.raises(RuntimeError, match="2 KV transfers already pinned"):
        reg.add(SOURCE, None)
    with pytest.raises(ValueError, match=r"1\.\.64 characters"):
        TransferRegistry(1.0, 1).add(SOURCE, None, "x" * 65)
