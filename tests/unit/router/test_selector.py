from __future__ import annotations

import pytest

from lightspeed.errors import InvalidRequest
from lightspeed.protocol import WorkerCard
from lightspeed.router.active import ActiveLoad
from lightspeed.router.selector import (
    PickSelector,
    RouteDecision,
    RouteRequest,
    WorkerSelector,
    make_selector,
    pick_pinned,
)

WORKERS = [WorkerCard(instance_id=f"w{i}", model="m", address=f"127.0.0.1:{9000 + i}") for i in range(3)]
REQ = RouteRequest("r", [1, 2, 3])


def test_round_robin_cycles_in_order() -> None:
    sel = make_selector("round-robin", ActiveLoad())
    assert [sel.pick(REQ, WORKERS).instance_id for _ in range(7)] == ["w0", "w1", "w2", "w0", "w1", "w2", "w0"]


def test_random_covers_all_workers() -> None:
    sel = make_selector("random", ActiveLoad())
    assert {sel.pick(REQ, WORKERS).instance_id for _ in range(200)} == {"w0", "w1", "w2"}


def test_least_loaded_prefers_fewest_requests_then_prefill_tokens() -> None:
    active = ActiveLoad()
    sel = make_selector("least-loaded", active)
    active.add("a", "w0", 100)
    active.add("b", "w1", 10)
    assert sel.pick(REQ, WORKERS).instance_id == "w2"
    active.add("c", "w2", 50)
    assert sel.pick(REQ, WORKERS).instance_id == "w1"  # all 1 request; w1 has fewest prefill tokens
    active.prefill_done("a")
    assert sel.pick(REQ, WORKERS).instance_id == "w0"  # w0's prefill is done: 0 tokens


def test_direct_mode_requires_a_pin() -> None:
    sel = make_selector("direct", ActiveLoad())
    with pytest.raises(InvalidRequest):
        sel.pick(REQ, WORKERS)


async def test_route_of_a_pick_selector_describes_the_load_on_the_pick() -> None:
    sel = make_selector("round-robin", ActiveLoad())
    card = WorkerCard(instance_id="w", model="m", address="x:1", block_size=4)
    # 10 tokens on 4-token blocks: all 10 to prefill, 3 blocks (2 full + 1 partial).
    assert await sel.route(RouteRequest("r", list(range(10))), [card]) == RouteDecision(card, 10, 3)


def test_a_selector_must_implement_route() -> None:
    class NoRoute(WorkerSelector):
        pass

    class NoPick(PickSelector):
        pass

    with pytest.raises(TypeError, match=r"abstract method '?route'?$"):
        NoRoute()  # type: ignore[abstract]  # the point: the ABC refuses it
    with pytest.raises(TypeError, match=r"abstract method '?pick'?$"):
        NoPick()  # type: ignore[abstract]  # the point: the ABC refuses it


def test_pick_pinned() -> None:
    assert pick_pinned(RouteRequest("r", [], pinned_worker="w1"), WORKERS).instance_id == "w1"
    with pytest.raises(InvalidRequest):
        pick_pinned(RouteRequest("r", [], pinned_worker="zz"), WORKERS)


def test_unknown_mode() -> None:
    with pytest.raises(ValueError, match="unknown router mode"):
        make_selector("fastest", ActiveLoad())
