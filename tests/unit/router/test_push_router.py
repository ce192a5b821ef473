from __future__ import annotations

from lightspeed.protocol import WorkerCard
from lightspeed.router.active import ActiveLoad
from lightspeed.router.kv_router import KvRouterConfig, KvSelector
from lightspeed.router.push_router import PushRouter
from lightspeed.router.selector import RouteRequest
from lightspeed.runtime.request_plane import RequestPlaneClient

CARD = WorkerCard(instance_id="a", model="m", address="x:1", block_size=4)


async def test_a_removed_worker_leaves_the_active_set_the_sessions_and_the_selector() -> None:
    active = ActiveLoad()
    selector = KvSelector(active, KvRouterConfig(use_kv_events=False, seed=0))
    router = PushRouter(RequestPlaneClient(), selector, active)
    decision = await router.route(RouteRequest("r", list(range(8)), session_id="s"), [CARD])
    assert active.get("a").requests == 1 and router.sessions.lookup("s") == "a"
    assert selector.index.find_matches(decision.hashes) == {"a": 2}
    router.remove_worker("a")
    assert active.get("a").requests == 0
    assert router.sessions.lookup("s") is None
    assert selector.index.find_matches(decision.hashes) == {}


async def test_without_session_affinity_the_header_is_ignored() -> None:
    """Round-robin stays round-robin for a client that sends x-session-id (as Dynamo's does)."""
    from lightspeed.router.selector import RoundRobinSelector
    from lightspeed.router.session import SessionAffinity

    cards = [CARD, WorkerCard(instance_id="b", model="m", address="y:1", block_size=4)]
    chosen = {}
    for affinity in (True, False):
        active = ActiveLoad()
        sessions = SessionAffinity(enabled=affinity)
        router = PushRouter(RequestPlaneClient(), RoundRobinSelector(active), active, sessions)
        picks = [await router.route(RouteRequest(f"r{i}", [1, 2], session_id="s"), cards) for i in range(4)]
        chosen[affinity] = [d.card.instance_id for d in picks]
    assert chosen == {True: ["a", "a", "a", "a"], False: ["a", "b", "a", "b"]}
