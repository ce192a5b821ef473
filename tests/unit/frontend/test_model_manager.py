"""The frontend's fleet view: models and workers from discovery, and workers reported down."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from lightspeed.frontend.model_manager import ModelManager
from lightspeed.protocol import WorkerCard, WorkerRole
from lightspeed.runtime.discovery import MemDiscovery
from tests.polling import until


@pytest.fixture
def make_card(smollm_folder: Path) -> Callable[..., WorkerCard]:
    def make(instance_id: str, role: WorkerRole = WorkerRole.AGG, blocks: int = 100) -> WorkerCard:
        return WorkerCard(
            instance_id=instance_id,
            model="m",
            address="127.0.0.1:1",
            role=role,
            total_kv_blocks=blocks,
            context_length=4096,
            model_path=str(smollm_folder),
        )

    return make


@pytest.fixture
async def fleet(request: pytest.FixtureRequest) -> AsyncIterator[tuple[MemDiscovery, ModelManager]]:
    """Workers' discovery and a manager on it; `indirect` parameter: its down_seconds (60)."""
    name = f"test-{uuid.uuid4().hex}"
    down_seconds = getattr(request, "param", 60.0)
    workers, manager = MemDiscovery(name), ModelManager(MemDiscovery(name), down_seconds=down_seconds)
    await manager.start()
    yield workers, manager
    await manager.stop()


def ids(cards: list[WorkerCard]) -> list[str]:
    return [c.instance_id for c in cards]


async def test_serving_workers_are_sorted_and_exclude_prefill(
    fleet: tuple[MemDiscovery, ModelManager], make_card: Callable[..., WorkerCard]
) -> None:
    workers, manager = fleet
    for card in (make_card("b"), make_card("p", WorkerRole.PREFILL), make_card("a", WorkerRole.DECODE)):
        await workers.register(card)
    await until(lambda: manager.get("m") is not None and len(manager.get("m").workers) == 3, timeout=5.0)
    entry = manager.get("m")
    assert ids(entry.serving_workers()) == ["a", "b"]
    assert entry.context_length == 4096 and [m.name for m in manager.models()] == ["m"]


@pytest.mark.parametrize("fleet", [0.2], indirect=True)
async def test_a_worker_reported_down_is_skipped_until_its_quarantine_ends(
    fleet: tuple[MemDiscovery, ModelManager], make_card: Callable[..., WorkerCard]
) -> None:
    workers, manager = fleet
    await workers.register(make_card("a"))
    await workers.register(make_card("b"))
    await until(lambda: manager.get("m") is not None and len(manager.get("m").workers) == 2, timeout=5.0)
    entry = manager.get("m")
    reported = time.monotonic()
    manager.report_down("a")  # for 0.2 s
    assert ids(entry.serving_workers()) == ["b"] and entry.is_down("a")
    assert ids(manager.all_workers()) == ["a", "b"]  # still registered: discovery decides that
    await until(lambda: ids(entry.serving_workers()) == ["a", "b"], timeout=5, interval=0.01, what="quarantine end")
    assert time.monotonic() - reported >= 0.2 and entry.down_until == {}


async def test_registering_again_clears_down_and_leaving_keeps_it_down(
    fleet: tuple[MemDiscovery, ModelManager], make_card: Callable[..., WorkerCard]
) -> None:
    workers, manager = fleet
    removed: list[str] = []
    manager.on_worker_removed.append(removed.append)
    await workers.register(make_card("a"))
    await workers.register(make_card("b"))
    await until(lambda: manager.get("m") is not None and len(manager.get("m").workers) == 2, timeout=5.0)
    entry = manager.get("m")
    manager.report_down("a")
    manager.report_down("b")
    manager.report_down("unknown")  # not in discovery: nothing to do
    assert entry.serving_workers() == []
    await workers.register(make_card("a", blocks=200))  # a changed card: the worker is alive
    await until(lambda: ids(entry.serving_workers()) == ["a"], timeout=5.0)
    await workers.deregister("b")
    await until(lambda: removed == ["b"], timeout=5.0)
    # Gone, and down for its quarantine: a request pinned to it is "not reachable" (503).
    assert entry.is_down("b") and ids(manager.all_workers()) == ["a"] and not manager.is_healthy("b")
    await workers.register(make_card("b"))  # the same instance back (its entry had expired)
    await until(lambda: ids(entry.serving_workers()) == ["a", "b"], timeout=5.0)
    assert not entry.is_down("b") and manager.is_healthy("b")
    await workers.deregister("a")
    await workers.deregister("b")
    await until(lambda: manager.models() == [], timeout=5.0)
    assert manager.get("m") is entry  # the model (and its tokenizer) stays for a returning worker


async def test_quarantines_of_departed_workers_are_pruned(
    fleet: tuple[MemDiscovery, ModelManager], make_card: Callable[..., WorkerCard]
) -> None:
    workers, manager = fleet
    for name in ("a", "b", "c"):
        await workers.register(make_card(name))
    await until(lambda: manager.get("m") is not None and len(manager.get("m").workers) == 3, timeout=5.0)
    entry = manager.get("m")
    await workers.deregister("a")
    await until(lambda: "a" in entry.down_until, timeout=5.0)
    entry.down_until["a"] = time.monotonic() - 1.0  # as if its quarantine were over
    await workers.deregister("b")  # each departure prunes the quarantines that are over
    await until(lambda: "b" in entry.down_until, timeout=5.0)
    assert sorted(entry.down_until) == ["b"]


def test_a_non_positive_quarantine_is_rejected() -> None:
    with pytest.raises(ValueError, match="down_seconds"):
        ModelManager(MemDiscovery(f"test-{uuid.uuid4().hex}"), down_seconds=0)
