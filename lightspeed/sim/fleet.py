"""The simulated fleet: workers starting, serving, draining and retired, and what they cost.

A worker costs from the moment it is launched (a machine is held while it starts) until it
retires: at once when a start is cancelled, else when it has drained (a draining worker gets no
new requests and retires when its last one finishes). Worker-seconds sum those spans.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from dataclasses import dataclass, field

from lightspeed.engine.config import EngineConfig
from lightspeed.mocker.timing import MockerTiming
from lightspeed.protocol import KvEvent, PerfModel, WorkerCard
from lightspeed.sim.worker import SimWorker


class State(enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    DRAINING = "draining"
    RETIRED = "retired"


@dataclass(slots=True)
class Member:
    worker: SimWorker
    card: WorkerCard
    launched_s: float
    state: State = State.STARTING
    retired_s: float | None = None


@dataclass(frozen=True, slots=True)
class ReplicaPoint:
    """Fleet size after a change at `t_s`: workers taking requests, and workers paid for."""

    t_s: float
    serving: int
    provisioned: int


@dataclass
class Fleet:
    engine: EngineConfig
    speedup_ratio: float
    on_kv_events: Callable[[list[KvEvent]], None]
    seed: int = 0
    members: dict[str, Member] = field(default_factory=dict)
    history: list[ReplicaPoint] = field(default_factory=list)
    _serving_cards: list[WorkerCard] = field(default_factory=list)

    def launch(self, now: float) -> Member:
        """A new worker, STARTING until `serve` is called for it."""
        index = len(self.members)
        worker_id = f"worker-{index}"
        # Each worker samples its own token stream, fixed by the replay seed and its index.
        engine = dataclasses.replace(self.engine, seed=self.seed * 1_000_003 + index)
        worker = SimWorker(worker_id, engine, self.speedup_ratio, self.on_kv_events)
        member = Member(worker, self._card(worker), now)
        self.members[worker_id] = member
        self._changed(now)
        return member

    def serve(self, member: Member, now: float) -> None:
        member.state = State.SERVING
        self._changed(now)

    def drain(self, member: Member, now: float) -> None:
        member.state = State.DRAINING
        self._changed(now)
        if member.worker.num_unfinished == 0:
            self.retire(member, now)

    def retire(self, member: Member, now: float) -> None:
        member.state = State.RETIRED
        member.retired_s = now
        self._changed(now)

    def perf_model(self) -> PerfModel:
        """The step-time model every worker runs by (the mocker's, speedup included)."""
        return MockerTiming(self.speedup_ratio).perf

    def serving_cards(self) -> list[WorkerCard]:
        """Candidates for routing, in launch order (a live list: do not keep it)."""
        return self._serving_cards

    def in_state(self, *states: State) -> list[Member]:
        return [m for m in self.members.values() if m.state in states]

    @property
    def provisioned(self) -> int:
        """Workers the planner counts: serving or on their way."""
        return sum(1 for m in self.members.values() if m.state in (State.STARTING, State.SERVING))

    def worker_seconds(self, end_s: float) -> float:
        return sum((m.retired_s if m.retired_s is not None else end_s) - m.launched_s for m in self.members.values())

    @property
    def peak_provisioned(self) -> int:
        return max((p.provisioned for p in self.history), default=0)

    def _changed(self, now: float) -> None:
        self._serving_cards = [m.card for m in self.members.values() if m.state is State.SERVING]
        paid = sum(1 for m in self.members.values() if m.state is not State.RETIRED)
        point = ReplicaPoint(now, len(self._serving_cards), paid)
        if self.history and self.history[-1].t_s == now:
            self.history[-1] = point
        else:
            self.history.append(point)

    def _card(self, worker: SimWorker) -> WorkerCard:
        """What a mocker worker registers (worker/process.py), perf model included."""
        cfg = self.engine
        return WorkerCard(
            instance_id=worker.worker_id,
            model="replay",
            address="sim",
            block_size=cfg.block_size,
            total_kv_blocks=cfg.num_gpu_blocks,
            max_num_seqs=cfg.max_num_seqs,
            max_num_batched_tokens=cfg.max_num_batched_tokens,
            context_length=cfg.max_model_len,
            perf=worker.perf,
        )
