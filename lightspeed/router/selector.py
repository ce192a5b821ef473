"""Worker selection policies that need no KV index.

A selector only *chooses* a worker; sending and load tracking belong to the push router.
New policies register themselves in `SELECTORS` so the frontend picks them by name.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lightspeed.errors import InvalidRequest
from lightspeed.protocol import WorkerCard
from lightspeed.router.active import ActiveLoad


@dataclass(frozen=True, slots=True)
class RouteRequest:
    request_id: str
    token_ids: list[int]
    pinned_worker: str | None = None  # direct routing (header x-worker-instance-id)
    session_id: str | None = None


class WorkerSelector(ABC):
    @abstractmethod
    def select(self, req: RouteRequest, workers: Sequence[WorkerCard]) -> WorkerCard:
        """Pick one of `workers` (never empty: the caller handles the no-worker case)."""


class RoundRobinSelector(WorkerSelector):
    def __init__(self, active: ActiveLoad) -> None:
        self._next = 0

    def select(self, req: RouteRequest, workers: Sequence[WorkerCard]) -> WorkerCard:
        card = workers[self._next % len(workers)]
        self._next += 1
        return card


class RandomSelector(WorkerSelector):
    def __init__(self, active: ActiveLoad, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def select(self, req: RouteRequest, workers: Sequence[WorkerCard]) -> WorkerCard:
        return workers[self._rng.randrange(len(workers))]


class LeastLoadedSelector(WorkerSelector):
    """Fewest in-flight requests, then fewest pending prefill tokens; ties go round-robin."""

    def __init__(self, active: ActiveLoad) -> None:
        self._active = active
        self._tie = 0

    def select(self, req: RouteRequest, workers: Sequence[WorkerCard]) -> WorkerCard:
        def key(card: WorkerCard) -> tuple[int, int]:
            load = self._active.get(card.instance_id)
            return (load.requests, load.prefill_tokens)

        best = min(key(c) for c in workers)
        tied = [c for c in workers if key(c) == best]
        self._tie += 1
        return tied[self._tie % len(tied)]


class DirectSelector(WorkerSelector):
    """Every request must name its worker (header `x-worker-instance-id`)."""

    def __init__(self, active: ActiveLoad) -> None:
        pass

    def select(self, req: RouteRequest, workers: Sequence[WorkerCard]) -> WorkerCard:
        raise InvalidRequest(
            "router mode 'direct' needs the header x-worker-instance-id", param="x-worker-instance-id"
        )


SELECTORS: dict[str, Callable[[ActiveLoad], WorkerSelector]] = {
    "round-robin": RoundRobinSelector,
    "random": RandomSelector,
    "least-loaded": LeastLoadedSelector,
    "direct": DirectSelector,
}


def make_selector(mode: str, active: ActiveLoad) -> WorkerSelector:
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
