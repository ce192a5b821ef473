"""The discrete-event loop: arrivals, step emissions, worker starts and planner ticks on one heap.

Virtual time jumps from event to event; nothing sleeps. An arrival is routed at once (the
production selector, `SimRouter`) and queued on its worker's scheduler; an idle worker schedules
a step there and then. A step's emission event folds the step back in (`SimWorker.finish_step`),
delivers its tokens to the requests (first token: `prefill_done`; last: `free`, as the frontend
does) and schedules the worker's next step. When every worker is busy in the router's sense the
request waits in an admission queue and is retried whenever load is released, as the router's
own queue is woken. Planner ticks resize the fleet: new workers serve after a start delay,
removed ones drain.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

from tqdm import tqdm

from lightspeed.bench.workload import RequestSpec
from lightspeed.engine.types import EngineCoreOutput
from lightspeed.planner.arithmetic import EngineLimits
from lightspeed.planner.core import Decision
from lightspeed.protocol import PreprocessedRequest, StopConditions
from lightspeed.router.admission import AdmissionConfig, AdmissionQueue
from lightspeed.router.selector import RouteRequest
from lightspeed.sim.autoscale import PlannerLoop
from lightspeed.sim.config import ReplayConfig
from lightspeed.sim.fleet import Fleet, Member, ReplicaPoint, State
from lightspeed.sim.requests import SimRequest
from lightspeed.sim.router import SimRouter

logger = logging.getLogger(__name__)

# Event kinds, in the order same-instant events are handled: tokens leave before a new worker
# joins, which happens before an arrival is routed, which happens before the planner looks.
EMIT, READY, ARRIVAL, TICK = range(4)


@dataclass(frozen=True)
class SimOutcome:
    requests: list[SimRequest]
    end_s: float  # virtual time of the last arrival or completion
    worker_seconds: float
    peak_workers: int
    replicas: list[ReplicaPoint]
    decisions: list[Decision]
    wall_s: float
    events: int
    kv_events: int


@dataclass(order=True, slots=True)
class _Queued:
    priority: tuple[float, int]
    request: SimRequest = dataclasses.field(compare=False)
    body: PreprocessedRequest = dataclasses.field(compare=False)


class Simulation:
    def __init__(self, cfg: ReplayConfig, specs: Iterator[RequestSpec], expected_end_s: float | None = None) -> None:
        self.cfg = cfg
        self.now = 0.0
        self._heap: list[tuple[float, int, int, object]] = []
        self._seq = itertools.count()
        fleet_cfg = cfg.fleet
        self.router = SimRouter(fleet_cfg.router_mode, fleet_cfg.router, self.clock, seed=cfg.trace.seed)
        self.router.active.on_release.append(self._note_release)
        self.fleet = Fleet(fleet_cfg.engine, fleet_cfg.speedup_ratio, self.router.on_kv_events, seed=cfg.trace.seed)
        r = fleet_cfg.router
        self.admission = AdmissionQueue(AdmissionConfig(r.queue_policy, r.max_queue, r.queue_timeout))
        self._queue: list[_Queued] = []
        self._released = False
        self._specs = specs
        self._base: float | None = None
        self._requests: list[SimRequest] = []
        self._live: dict[str, SimRequest] = {}
        self._arrivals_left = True
        self._last_done = 0.0
        self._events = 0
        self._expected_end = expected_end_s
        self.planner = self._make_planner()

    def clock(self) -> float:
        return self.now

    # ------------------------------------------------------------------ run

    def run(self) -> SimOutcome:
        started = time.perf_counter()
        for _ in range(self.cfg.fleet.workers):
            self._serve(self.fleet.launch(0.0))
        self._next_arrival()
        if self.planner is not None:
            self._push(self.planner.interval_s, TICK, None)
        with tqdm(
            total=self._expected_end, disable=not self.cfg.progress, unit="s", unit_scale=True, mininterval=0.5
        ) as bar:
            self._loop(bar)
        end = self._last_done
        return SimOutcome(
            requests=self._requests,
            end_s=end,
            worker_seconds=self.fleet.worker_seconds(end),
            peak_workers=self.fleet.peak_provisioned,
            replicas=self.fleet.history,
            decisions=self.planner.decisions if self.planner is not None else [],
            wall_s=time.perf_counter() - started,
            events=self._events,
            kv_events=self.router.kv_events_applied,
        )

    def _loop(self, bar: tqdm) -> None:
        heap = self._heap
        shown = 0
        while heap:
            t, kind, _, payload = heapq.heappop(heap)
            if kind == TICK and not self._busy():
                break  # only the planner's clock is left: the replay is over
            self.now = t
            self._events += 1
            if kind == EMIT:
                self._on_emit(payload)  # type: ignore[arg-type]
            elif kind == ARRIVAL:
                self._on_arrival(payload)  # type: ignore[arg-type]
            elif kind == READY:
                self._on_ready(payload)  # type: ignore[arg-type]
            else:
                self._on_tick()
            if self._released:
                self._retry_queued()
            if t - shown >= 1.0:
                bar.update(int(t - shown))
                shown = int(t)

    def _busy(self) -> bool:
        return self._arrivals_left or bool(self._live)

    def _push(self, t: float, kind: int, payload: object) -> None:
        heapq.heappush(self._heap, (t, kind, next(self._seq), payload))

    # ------------------------------------------------------------------ arrivals and routing

    def _next_arrival(self) -> None:
        spec = next(self._specs, None)
        if spec is not None:
            self._base = spec.arrival_s if self._base is None else self._base
            due = (spec.arrival_s - self._base) / self.cfg.trace.speedup
            limit = self.cfg.trace.duration_s
            if limit is None or due < limit:
                self._push(due, ARRIVAL, spec)
                return
        self._arrivals_left = False

    def _on_arrival(self, spec: RequestSpec) -> None:
        self._next_arrival()
        if isinstance(spec.prompt, str):
            raise ValueError("replay needs token-id prompts (Mooncake or Azure traces)")
        rid = f"req-{len(self._requests)}"
        rec = SimRequest(rid, self.now, len(spec.prompt), spec.max_tokens)
        self._requests.append(rec)
        self._live[rid] = rec
        if self.planner is not None:
            stats = self.planner.stats
            stats.arrivals += 1
            stats.isl_sum += rec.prompt_tokens
        body = PreprocessedRequest(
            request_id=rid,
            model="replay",
            token_ids=list(spec.prompt),
            stop=StopConditions(max_tokens=spec.max_tokens, ignore_eos=spec.ignore_eos),
        )
        if not self._try_route(rec, body):
            self._enqueue(rec, body)

    def _try_route(self, rec: SimRequest, body: PreprocessedRequest) -> bool:
        """Route and hand over, or False when every worker is busy (the request must wait)."""
        cards = self.fleet.serving_cards()
        if not cards:
            self._fail(rec, "http_503", "no workers are serving the model")
            return True
        decision = self.router.route(RouteRequest(rec.request_id, body.token_ids), cards)
        if decision is None:
            return False
        member = self.fleet.members[decision.card.instance_id]
        rec.worker_id = member.worker.worker_id
        try:
            member.worker.add_request(body)
        except ValueError as err:  # the worker refuses what can never run: a 400 to the client
            self.router.free(rec.request_id)
            self._fail(rec, "http_400", str(err))
            return True
        if not member.worker.busy:
            self._kick(member)
        return True

    def _enqueue(self, rec: SimRequest, body: PreprocessedRequest) -> None:
        admission = self.admission
        if len(self._queue) >= admission.cfg.max_size:
            self._fail(rec, "http_503", f"all workers are busy and {len(self._queue)} requests are already queued")
            return
        ticket = admission.ticket(rec.request_id, rec.prompt_tokens)
        heapq.heappush(self._queue, _Queued(ticket.priority, rec, body))

    def _note_release(self) -> None:
        self._released = True

    def _retry_queued(self) -> None:
        """Load went down: waiters re-check in their order until one still finds all busy."""
        self._released = False
        max_wait = self.admission.cfg.max_wait_s
        while self._queue:
            head = self._queue[0]
            if self.now - head.request.arrival_s > max_wait:
                heapq.heappop(self._queue)
                self._fail(head.request, "http_503", f"request waited {max_wait:.0f}s for a free worker")
                continue
            if not self._try_route(head.request, head.body):
                return
            heapq.heappop(self._queue)

    # ------------------------------------------------------------------ steps

    def _kick(self, member: Member) -> None:
        emit = member.worker.start_step(self.now)
        if emit is not None:
            self._push(emit, EMIT, member)
        elif member.state is State.DRAINING and member.worker.num_unfinished == 0:
            self.fleet.retire(member, self.now)

    def _on_emit(self, member: Member) -> None:
        for output in member.worker.finish_step():
            self._deliver(output)
        self._kick(member)

    def _deliver(self, output: EngineCoreOutput) -> None:
        rec = self._live.get(output.request_id)
        if rec is None:
            return
        first = rec.first_s is None
        gap = rec.on_tokens(self.now, len(output.new_token_ids), output.num_cached_tokens)
        stats = self.planner.stats if self.planner is not None else None
        if first:
            self.router.prefill_done(rec.request_id)
            if stats is not None and rec.first_s is not None:
                stats.ttfts.append(rec.first_s - rec.arrival_s)
                stats.cached_tokens += rec.cached_tokens or 0
                stats.prompt_tokens += rec.prompt_tokens
        elif stats is not None and gap is not None:
            stats.itls.append(gap)
        if output.finish_reason is not None:
            rec.end_s = self.now
            self._done(rec)
            self.router.free(rec.request_id)
            if stats is not None:
                stats.completions += 1
                stats.osl_sum += rec.output_tokens

    def _fail(self, rec: SimRequest, error: str, detail: str) -> None:
        rec.fail(self.now, error, detail)
        self._done(rec)

    def _done(self, rec: SimRequest) -> None:
        self._live.pop(rec.request_id, None)
        self._last_done = max(self._last_done, self.now)

    # ------------------------------------------------------------------ fleet and planner

    def _make_planner(self) -> PlannerLoop | None:
        settings = self.cfg.planner
        if not settings.enabled:
            return None
        engine = self.cfg.fleet.engine
        limits = EngineLimits(engine.num_gpu_blocks * engine.block_size, engine.max_num_seqs)
        perf = self.fleet.perf_model()
        return PlannerLoop(settings, perf, limits, self.cfg.fleet.workers)

    def _serve(self, member: Member) -> None:
        self.fleet.serve(member, self.now)
        self.router.add_worker(member.worker.worker_id)

    def _on_ready(self, member: Member) -> None:
        if member.state is State.STARTING:  # not cancelled while it started
            self._serve(member)
            self._released = True  # queued requests may fit on the newcomer

    def _on_tick(self) -> None:
        assert self.planner is not None
        target = self.planner.tick(self.fleet.provisioned)
        self._scale_to(target)
        self._push(self.now + self.planner.interval_s, TICK, None)

    def _scale_to(self, target: int) -> None:
        delay = self.cfg.planner.start_delay_s
        for _ in range(target - self.fleet.provisioned):
            member = self.fleet.launch(self.now)
            if delay == 0:
                self._serve(member)
            else:
                self._push(self.now + delay, READY, member)
        excess = self.fleet.provisioned - target
        if excess > 0:
            self._shrink(excess)

    def _shrink(self, excess: int) -> None:
        """Cancel starts first (newest first), then drain the least loaded serving workers."""
        starting = self.fleet.in_state(State.STARTING)[::-1]
        for member in starting[:excess]:
            self.fleet.retire(member, self.now)
        excess -= min(excess, len(starting))
        serving = self.fleet.in_state(State.SERVING)
        serving.sort(key=lambda m: (m.worker.num_unfinished, -m.launched_s))
        for member in serving[: min(excess, len(serving) - 1)]:  # never drain the last one
            self.router.remove_worker(member.worker.worker_id)
            self.fleet.drain(member, self.now)
