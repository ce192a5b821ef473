"""Worker selection: the `WorkerSelector` seam, and the policies that need no KV index.

A selector only *chooses* a worker; sending and load tracking belong to the push router.
New policies register themselves in `SELECTORS` so the frontend picks them by name (the KV
selector, in `kv_router`, is built by `factory`).
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lightspeed.errors import InvalidRequest
from lightspeed.protocol import WorkerCard
from lightspeed.router.active import ActiveLoad, LoadChange


@dataclass(frozen=True, slots=True)
class RouterOverrides:
    """Per-request knobs of the KV cost (`nvext.router_config_override` or x-router-* headers)."""

    overlap_score_weight: float | None = None
    temperature: float | None = None

    def __post_init__(self) -> None:
        if self.overlap_score_weight is not None and self.overlap_score_weight < 0:
            raise ValueError(f"overlap_score_weight must be >= 0, got {self.overlap_score_weight}")
        if self.temperature is not None and self.temperature < 0:
            raise ValueError(f"router temperature must be >= 0, got {self.temperature}")


@dataclass(frozen=True, slots=True)
class RouteRequest:
    request_id: str
    token_ids: list[int]
    pinned_worker: str | None = None  # direct routing (header x-worker-instance-id)
    session_id: str | None = None  # session affinity (header x-session-id)
    lora_name: str | None = None
    overrides: RouterOverrides | None = None


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """The chosen worker and the load the request puts on it (what the active set records)."""

    card: WorkerCard
    prefill_tokens: int  # tokens the worker must compute (prompt minus its cached prefix)
    blocks: int = 0  # KV blocks the request occupies (full + partial)
    hashes: tuple[int, ...] = ()  # sequence hashes of its full blocks (shared-prefix accounting)
    overlap_blocks: int = 0


class WorkerSelector(ABC):
    """Chooses a worker for each request. `route` is async because a selector may make the
    request wait (the KV selector's admission queue); policies that never wait derive from
    `PickSelector` and only implement its synchronous `pick`."""

    @abstractmethod
    async def route(self, req: RouteRequest, workers: Sequence[WorkerCard]) -> RouteDecision:
        """Choose one of `workers` (never empty: the caller handles the no-worker case) and
        describe the load the request puts on it."""

    def decision_for(self, req: RouteRequest, card: WorkerCard) -> RouteDecision:
        """The load of `req` on an already-chosen worker (pinned or session-affine)."""
        isl = len(req.token_ids)
        return RouteDecision(card, isl, -(-isl // max(1, card.block_size)))

    # Hooks for selectors that keep state per worker; the stateless ones have nothing to do.
    def mirror(self, change: LoadChange) -> None:  # noqa: B027 -- optional hook, a no-op by design
        """A router replica's load change (see `replica_sync`)."""

    def remove_worker(self, worker_id: str) -> None:  # noqa: B027 -- optional hook, a no-op by design
        """`worker_id` left discovery."""


class PickSelector(WorkerSelector):
    """A policy that decides at once from the candidates and the active load alone."""

    @abstractmethod
    def pick(self, req: RouteRequest, workers: Sequence[WorkerCard]) -> WorkerCard:
        """Pick one of `workers` (never empty)."""

    async def route(self, req: RouteRequest, workers: Sequence[WorkerCard]) -> RouteDecision:
        return self.decision_for(req, self.pick(req, workers))


class RoundRobinSelector(PickSelector):
    def __init__(self, active: ActiveLoad) -> None:
        self._next = 0

    def pick(self, req: RouteRequest, workers: Sequence[WorkerCard]) -> WorkerCard:
        card = workers[self._next % len(workers)]
        self._next += 1
        return card


class RandomSelector(PickSelector):
    def __init__(self, active: ActiveLoad, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def pick(self, req: RouteRequest, workers: Sequence[WorkerCard]) -> WorkerCard:
        return workers[self._rng.randrange(len(workers))]


class LeastLoadedSelector(PickSelector):
    """Fewest in-flight requests, then fewest pending prefill tokens; ties go round-robin."""

    def __init__(self, active: ActiveLoad) -> None:
        self._active = active
        self._tie = 0

    def pick(self, req: RouteRequest, workers: Sequence[WorkerCard]) -> WorkerCard:
        def key(card: WorkerCard) -> tuple[int, int]:
            load = self._active.get(card.instance_id)
            return (load.requests, load.prefill_tokens)

        best = min(key(c) for c in workers)
        tied = [c for c in workers if key(c) == best]
        self._tie += 1
        return tied[self._tie % len(tied)]


class PowerOfTwoSelector(PickSelector):
    """Sample two workers, take the less loaded: near least-loaded balance without herding
    every router replica onto the same momentarily idle worker."""

    def __init__(self, active: ActiveLoad, seed: int | None = None) -> None:
        self._active = active
        self._rng = random.Random(seed)

    def pick(self, req: RouteRequest, workers: Sequence[WorkerCard]) -> WorkerCard:
        if len(workers) == 1:
            return workers[0]
        a, b = self._rng.sample(range(len(workers)), 2)
        load_a = self._active.get(workers[a].instance_id)
        load_b = self._active.get(workers[b].instance_id)
        key_a = (load_a.requests, load_a.prefill_tokens)
        key_b = (load_b.requests, load_b.prefill_tokens)
        return workers[b] if key_b < key_a else workers[a]


class DirectSelector(PickSelector):
    """Every request must name its worker (header `x-worker-instance-id`)."""

    def __init__(self, active: ActiveLoad) -> None:
        pass

    def pick(self, req: RouteRequest, workers: Sequence[WorkerCard]) -> WorkerCard:
        raise InvalidRequest("router mode 'direct' needs the header x-worker-instance-id", param="x-worker-instance-id")


SELECTORS: dict[str, Callable[[ActiveLoad], PickSelector]] = {
    "round-robin": RoundRobinSelector,
    "random": RandomSelector,
    "least-loaded": LeastLoadedSelector,
    "power-of-two": PowerOfTwoSelector,
    "direct": DirectSelector,
}


def make_selector(mode: str, active: ActiveLoad) -> PickSelector:
    try:
        factory = SELECTORS[mode]
    except KeyError:
        raise ValueError(f"unknown router mode {mode!r}; known: {', '.join(SELECTORS)}") from None
    return factory(active)


def pick_pinned(req: RouteRequest, workers: Sequence[WorkerCard]) -> WorkerCard:
    """Direct pinning, valid in every mode: the named worker or a 400."""
    for card in workers:
        if card.instance_id == req.pinned_worker:
            return card
    raise InvalidRequest(
        f"worker instance {req.pinned_worker!r} is not serving this model", param="x-worker-instance-id"
    )
