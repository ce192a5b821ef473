"""Discovery backends: mem (shared by name) and file (atomic files, heartbeat, ttl expiry)."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncGenerator
from pathlib import Path

import msgspec
import pytest

from lightspeed.protocol import WorkerCard, WorkerRole
from lightspeed.runtime import discovery as discovery_module
from lightspeed.runtime.discovery import (
    Discovery,
    DiscoveryEvent,
    DiscoverySpec,
    FileDiscovery,
    MemDiscovery,
    discovery_kinds,
    make_discovery,
    register_backend,
    remove_entries_of,
    write_atomic,
)
from tests.polling import until


def card(instance_id: str, blocks: int = 100) -> WorkerCard:
    return WorkerCard(
        instance_id=instance_id,
        model="m",
        address=f"127.0.0.1:{1000 + len(instance_id)}",
        role=WorkerRole.DECODE,
        total_kv_blocks=blocks,
    )


def put(c: WorkerCard) -> DiscoveryEvent:
    return DiscoveryEvent("put", c.instance_id, c)


def delete(instance_id: str) -> DiscoveryEvent:
    return DiscoveryEvent("delete", instance_id, None)


async def take(events: AsyncGenerator[DiscoveryEvent, None], n: int, timeout: float = 2.0) -> list[DiscoveryEvent]:
    return [await asyncio.wait_for(anext(events), timeout) for _ in range(n)]


async def assert_quiet(events: AsyncGenerator[DiscoveryEvent, None], seconds: float) -> None:
    task = asyncio.ensure_future(anext(events))
    done, _ = await asyncio.wait({task}, timeout=seconds)
    assert not done, f"unexpected event {task.result() if done else None}"
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def unique_name() -> str:
    return f"test-{uuid.uuid4().hex}"


# ---------------------------------------------------------------- mem


async def test_mem_instances_with_same_name_share_registry() -> None:
    name = unique_name()
    worker, frontend, other = MemDiscovery(name), MemDiscovery(name), MemDiscovery(unique_name())
    await worker.register(card("b"))
    await worker.register(card("a"))
    assert await frontend.list_cards() == [card("a"), card("b")]
    assert await other.list_cards() == []
    await worker.deregister("a")
    assert await frontend.list_cards() == [card("b")]


async def test_mem_watch_snapshot_then_changes() -> None:
    name = unique_name()
    worker, frontend = MemDiscovery(name), MemDiscovery(name)
    await worker.register(card("b"))
    await worker.register(card("a"))
    events = frontend.watch()
    assert await take(events, 2) == [put(card("a")), put(card("b"))]
    await worker.register(card("c"))
    await worker.register(card("c"))  # unchanged: no event
    await worker.register(card("a", blocks=7))
    await worker.deregister("b")
    await worker.deregister("b")  # already gone: no event
    assert await take(events, 3) == [put(card("c")), put(card("a", blocks=7)), delete("b")]
    await assert_quiet(events, 0.05)
    await events.aclose()


async def test_mem_close_deregisters_only_own_cards() -> None:
    name = unique_name()
    mine, theirs = MemDiscovery(name), MemDiscovery(name)
    await mine.register(card("x"))
    await theirs.register(card("y"))
    await mine.close()
    assert await theirs.list_cards() == [card("y")]


# ---------------------------------------------------------------- file


def fast_file(root: Path, ttl: float = 10.0, heartbeat: float = 2.0) -> FileDiscovery:
    return FileDiscovery(root, ttl=ttl, heartbeat_interval=heartbeat, poll_interval=0.01)


async def test_file_register_writes_one_decodable_file(tmp_path: Path) -> None:
    disc = fast_file(tmp_path)
    await disc.register(card("w1"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w1.json"]
    assert msgspec.json.decode((tmp_path / "w1.json").read_bytes(), type=WorkerCard) == card("w1")
    await disc.close()
    assert list(tmp_path.iterdir()) == []


async def test_file_instance_ids_are_escaped_into_file_names(tmp_path: Path) -> None:
    disc = fast_file(tmp_path)
    await disc.register(card("ns/worker:1"))
    assert [p.name for p in tmp_path.iterdir()] == ["ns%2Fworker%3A1.json"]
    assert await fast_file(tmp_path).list_cards() == [card("ns/worker:1")]
    await disc.deregister("ns/worker:1")
    assert list(tmp_path.iterdir()) == []


async def test_file_list_and_deregister_across_instances(tmp_path: Path) -> None:
    worker, frontend = fast_file(tmp_path), fast_file(tmp_path)
    await worker.register(card("b"))
    await worker.register(card("a"))
    assert await frontend.list_cards() == [card("a"), card("b")]
    await frontend.deregister("a")  # not registered by frontend: no-op
    assert await frontend.list_cards() == [card("a"), card("b")]
    await worker.deregister("a")
    assert await frontend.list_cards() == [card("b")]
    await worker.close()


async def test_file_watch_snapshot_then_changes(tmp_path: Path) -> None:
    worker, frontend = fast_file(tmp_path), fast_file(tmp_path)
    await worker.register(card("a"))
    events = frontend.watch()
    assert await take(events, 1) == [put(card("a"))]
    await worker.register(card("b"))
    assert await take(events, 1) == [put(card("b"))]
    await worker.register(card("b", blocks=5))
    assert await take(events, 1) == [put(card("b", blocks=5))]
    await worker.deregister("a")
    assert await take(events, 1) == [delete("a")]
    await worker.close()
    assert await take(events, 1) == [delete("b")]
    await events.aclose()


async def test_file_heartbeat_touch_emits_no_event(tmp_path: Path) -> None:
    worker = fast_file(tmp_path, ttl=1.0, heartbeat=0.02)
    await worker.register(card("a"))
    events = fast_file(tmp_path).watch()
    assert await take(events, 1) == [put(card("a"))]
    await assert_quiet(events, 0.15)  # several heartbeats and polls
    await events.aclose()
    await worker.close()


async def test_file_heartbeat_keeps_entry_alive_past_ttl(tmp_path: Path) -> None:
    worker = fast_file(tmp_path, ttl=0.4, heartbeat=0.02)
    await worker.register(card("a"))
    await asyncio.sleep(0.8)  # two ttls: only heartbeats can keep it listed
    assert await fast_file(tmp_path, ttl=0.4, heartbeat=0.02).list_cards() == [card("a")]
    await worker.close()


async def test_file_heartbeat_recreates_removed_entry(tmp_path: Path) -> None:
    worker = fast_file(tmp_path, ttl=1.0, heartbeat=0.02)
    await worker.register(card("a"))
    (tmp_path / "a.json").unlink()
    await until(lambda: (tmp_path / "a.json").exists(), timeout=5, interval=0.01, what="the entry to be rewritten")
    assert await fast_file(tmp_path).list_cards() == [card("a")]
    await worker.close()


def age(path: Path, seconds: float) -> None:
    old = time.time() - seconds
    os.utime(path, (old, old))


async def test_file_stale_entry_is_excluded_and_removed(tmp_path: Path) -> None:
    # A crashed worker: its file exists but nobody heartbeats it.
    write_atomic(tmp_path / "dead.json", msgspec.json.encode(card("dead")))
    write_atomic(tmp_path / "live.json", msgspec.json.encode(card("live")))
    age(tmp_path / "dead.json", 11.0)
    assert await fast_file(tmp_path).list_cards() == [card("live")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["live.json"]


async def test_file_watch_reports_expiry_as_delete(tmp_path: Path) -> None:
    write_atomic(tmp_path / "dead.json", msgspec.json.encode(card("dead")))
    events = fast_file(tmp_path).watch()
    assert await take(events, 1) == [put(card("dead"))]
    age(tmp_path / "dead.json", 11.0)
    assert await take(events, 1) == [delete("dead")]
    assert not (tmp_path / "dead.json").exists()
    await events.aclose()


async def test_file_ignores_temp_and_corrupt_files(tmp_path: Path) -> None:
    (tmp_path / ".a.json.123.abcd.tmp").write_bytes(b"{partial")
    (tmp_path / "broken.json").write_bytes(b"{not json")
    (tmp_path / "notes.txt").write_text("hello")
    write_atomic(tmp_path / "ok.json", msgspec.json.encode(card("ok")))
    assert await fast_file(tmp_path).list_cards() == [card("ok")]


async def test_file_missing_root_lists_nothing(tmp_path: Path) -> None:
    assert await fast_file(tmp_path / "absent").list_cards() == []


async def test_file_entries_of_an_exited_process_are_removed_and_watchers_see_it(tmp_path: Path) -> None:
    # What `serve` does when a worker process exits: its entries go now, not after the ttl.
    dead = [msgspec.structs.replace(card(i), pid=4242) for i in ("dead-1", "dead-2")]
    live = msgspec.structs.replace(card("live"), pid=4343)
    for c in (*dead, live):
        write_atomic(tmp_path / f"{c.instance_id}.json", msgspec.json.encode(c))
    (tmp_path / "broken.json").write_bytes(b"{not json")  # skipped, not fatal
    events = fast_file(tmp_path).watch()
    assert sorted(e.instance_id for e in await take(events, 3)) == ["dead-1", "dead-2", "live"]
    assert sorted(remove_entries_of(tmp_path, 4242)) == ["dead-1", "dead-2"]
    assert sorted(await take(events, 2), key=lambda e: e.instance_id) == [delete("dead-1"), delete("dead-2")]
    assert await fast_file(tmp_path).list_cards() == [live]
    assert remove_entries_of(tmp_path, 4242) == [] and remove_entries_of(tmp_path / "absent", 1) == []
    await events.aclose()


@pytest.mark.parametrize(
    ("ttl", "heartbeat", "poll"),
    [(0.0, 1.0, 1.0), (10.0, 0.0, 1.0), (10.0, 1.0, -1.0), (1.0, 1.0, 0.1)],
)
def test_file_config_validation(tmp_path: Path, ttl: float, heartbeat: float, poll: float) -> None:
    with pytest.raises(ValueError):
        FileDiscovery(tmp_path, ttl=ttl, heartbeat_interval=heartbeat, poll_interval=poll)


# ---------------------------------------------------------------- registry


async def test_make_discovery_kinds(tmp_path: Path) -> None:
    mem = make_discovery("mem", name=unique_name())
    assert isinstance(mem, MemDiscovery)
    file = make_discovery("file", path=str(tmp_path), ttl=5.0)
    assert isinstance(file, FileDiscovery)
    assert (file.root, file.ttl, file.heartbeat_interval) == (tmp_path, 5.0, 1.0)
    with pytest.raises(ValueError):
        make_discovery("zookeeper")
    with pytest.raises(ValueError):
        make_discovery("file", path=str(tmp_path), ttl=0.0)


async def test_register_backend_extends_make_discovery(monkeypatch: pytest.MonkeyPatch) -> None:
    # Work on a copy of the backend table so the test backend does not leak into other tests.
    monkeypatch.setattr(discovery_module, "_BACKENDS", dict(discovery_module._BACKENDS))
    seen: list[DiscoverySpec] = []

    def factory(spec: DiscoverySpec) -> Discovery:
        seen.append(spec)
        return MemDiscovery(spec.name)

    register_backend("test-backend", factory)
    assert "test-backend" in discovery_kinds()
    disc = make_discovery("test-backend", path="http://127.0.0.1:2379", name="n", ttl=3.0)
    assert isinstance(disc, MemDiscovery)
    assert seen == [DiscoverySpec(path="http://127.0.0.1:2379", name="n", ttl=3.0)]
