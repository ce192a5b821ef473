"""The KV-aware selector (`--router-mode kv`): send each request where its prefix is cached,
weighed against the load already queued on each worker.

Per request: hash the prompt's full blocks (Dynamo's sequence hashes), look up how many leading
blocks each worker holds (the exact event-fed index, or the approximate index built from this
router's own decisions), price every non-busy worker with the configured cost policy, and pick
the cheapest (or sample with temperature). When every worker is busy the request waits in the
admission queue. The selector only chooses; `PushRouter` sends and keeps the active set.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from lightspeed.kv_hashing import compute_prompt_seq_hashes
from lightspeed.protocol import DEFAULT_PERF_MODEL, WorkerCard
from lightspeed.router.active import ActiveLoad, LoadChange, WorkerLoad
from lightspeed.router.admission import AdmissionConfig, AdmissionQueue
from lightspeed.router.cost import (
    Candidate,
    KvCostConfig,
    block_cost,
    choose,
    latency_cost,
)
from lightspeed.router.indexer import ApproxIndex, KvIndex, PrefixIndex
from lightspeed.router.metrics import RouterMetrics
from lightspeed.router.selector import RouteDecision, RouteRequest, WorkerSelector

log = logging.getLogger(__name__)

_HOUSEKEEPING_EVERY_S = 1.0


@dataclass(frozen=True, slots=True)
class KvRouterConfig:
    cost: KvCostConfig = field(default_factory=KvCostConfig)
    use_kv_events: bool = True  # False: approximate mode (no events, own decisions with a TTL)
    approx_ttl: float = 120.0
    busy_decode_threshold: float | None = None  # busy above this fraction of total KV blocks
    busy_prefill_frac: float | None = None  # busy above this multiple of max_num_batched_tokens
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.approx_ttl <= 0:
            raise ValueError(f"approx_ttl must be > 0, got {self.approx_ttl}")
        if self.busy_decode_threshold is not None and self.busy_decode_threshold <= 0:
            raise ValueError(f"busy_decode_threshold must be > 0, got {self.busy_decode_threshold}")
        if self.busy_prefill_frac is not None and self.busy_prefill_frac <= 0:
            raise ValueError(f"busy_prefill_frac must be > 0, got {self.busy_prefill_frac}")


@dataclass(frozen=True, slots=True)
class _Prompt:
    hashes: tuple[int, ...]
    isl: int
    block_size: int

    @property
    def blocks(self) -> int:
        return -(-self.isl // self.block_size)


class KvSelector(WorkerSelector):
    """Cheapest worker by prefix overlap and queued load; the index (`PrefixIndex`) is exact or
    approximate by configuration, and the selector treats both alike."""

    def __init__(
        self,
        active: ActiveLoad,
        cfg: KvRouterConfig | None = None,
        metrics: RouterMetrics | None = None,
        index: PrefixIndex | None = None,
    ) -> None:
        self.cfg = cfg or KvRouterConfig()
        self.active = active
        self.metrics = metrics
        self.index = index if index is not None else _default_index(self.cfg)
        self.queue = AdmissionQueue(self.cfg.admission)
        self._rng = random.Random(self.cfg.seed)
        # On the active set's clock: a simulation runs it in virtual time.
        self._last_housekeeping = active.clock()
        active.on_release.append(self.queue.wake)

    async def route(self, req: RouteRequest, workers: Sequence[WorkerCard]) -> RouteDecision:
        decision, prompt = self._try(req, workers)
        if decision is None:
            decision = await self._admit(req, prompt, workers)
            self._record(decision, prompt)
        return decision

    def try_route(self, req: RouteRequest, workers: Sequence[WorkerCard]) -> RouteDecision | None:
        """`route` without waiting: the decision (recorded), or None when every worker is busy.
        For drivers without an event loop (the replay simulation keeps its own queue)."""
        return self._try(req, workers)[0]

    def _try(self, req: RouteRequest, workers: Sequence[WorkerCard]) -> tuple[RouteDecision | None, _Prompt]:
        t0 = time.perf_counter()
        prompt = self._prompt(req, workers[0].block_size)
        t1 = time.perf_counter()
        overlaps = self.index.find_matches(prompt.hashes)
        t2 = time.perf_counter()
        decision = self._decide(req, prompt, workers, overlaps)
        t3 = time.perf_counter()
        if decision is not None:
            self._record(decision, prompt)
        if self.metrics is not None:
            self.metrics.observe(t1 - t0, t2 - t1, t3 - t2)
        return decision, prompt

    def decision_for(self, req: RouteRequest, card: WorkerCard) -> RouteDecision:
        prompt = self._prompt(req, card.block_size)
        overlap = self.index.find_matches(prompt.hashes).get(card.instance_id, 0)
        decision = self._decision(card, prompt, overlap)
        self._record(decision, prompt)
        return decision

    def remove_worker(self, worker_id: str) -> None:
        self.index.remove_worker(worker_id)

    def mirror(self, change: LoadChange) -> None:
        """A replica's routing decision: the index hears of it as of this router's own."""
        if change.kind == "add":
            self.index.record(change.worker_id, change.hashes)

    # ------------------------------------------------------------------ internals

    def _prompt(self, req: RouteRequest, block_size: int) -> _Prompt:
        hashes = compute_prompt_seq_hashes(req.token_ids, block_size, req.lora_name)
        return _Prompt(tuple(hashes), len(req.token_ids), block_size)

    def _decide(
        self, req: RouteRequest, prompt: _Prompt, workers: Sequence[WorkerCard], overlaps: Mapping[str, int]
    ) -> RouteDecision | None:
        """The cheapest non-busy worker, or None when all are busy."""
        self._housekeeping()
        held = self.active.active_overlap(prompt.hashes)
        weight, temperature = self._knobs(req)
        latency = self.cfg.cost.policy == "latency"
        now = self.active.clock()
        costs: list[tuple[str, float]] = []
        by_id: dict[str, WorkerCard] = {}
        for card in workers:
            load = self.active.get(card.instance_id)
            if self._busy(card, load):
                continue
            cand = self._candidate(card, load, prompt, overlaps, held, now)
            # Workers whose cards carry no perf model are priced with Dynamo's default.
            cost = latency_cost(cand, DEFAULT_PERF_MODEL) if latency else block_cost(cand, weight)
            costs.append((card.instance_id, cost))
            by_id[card.instance_id] = card
        if not costs:
            return None
        card = by_id[choose(costs, temperature, self._rng)]
        return self._decision(card, prompt, overlaps.get(card.instance_id, 0))

    def _candidate(
        self,
        card: WorkerCard,
        load: WorkerLoad,
        prompt: _Prompt,
        overlaps: Mapping[str, int],
        held: Mapping[str, int],
        now: float,
    ) -> Candidate:
        overlap = overlaps.get(card.instance_id, 0)
        new_blocks = len(prompt.hashes) - held.get(card.instance_id, 0)
        partial = prompt.blocks - len(prompt.hashes)
        return Candidate(
            worker_id=card.instance_id,
            overlap_blocks=overlap,
            new_prefill_tokens=max(0, prompt.isl - overlap * prompt.block_size),
            active_prefill_tokens=load.prefill_tokens,
            decode_blocks=load.blocks + new_blocks + partial,
            total_blocks=card.total_kv_blocks,
            max_batched_tokens=card.max_num_batched_tokens,
            block_size=prompt.block_size,
            perf=card.perf,
            prefill_elapsed_s=now - load.prefill_since if load.prefill_tokens > 0 else 0.0,
            prefill_requests=load.prefill_requests,
            decoding_requests=load.decoding_requests,
        )

    def _decision(self, card: WorkerCard, prompt: _Prompt, overlap: int) -> RouteDecision:
        prefill = max(0, prompt.isl - overlap * prompt.block_size)
        return RouteDecision(card, prefill, prompt.blocks, prompt.hashes, overlap)

    def _knobs(self, req: RouteRequest) -> tuple[float, float]:
        weight, temperature = self.cfg.cost.overlap_score_weight, self.cfg.cost.temperature
        if req.overrides is not None:
            if req.overrides.overlap_score_weight is not None:
                weight = req.overrides.overlap_score_weight
            if req.overrides.temperature is not None:
                temperature = req.overrides.temperature
        return weight, temperature

    def _busy(self, card: WorkerCard, load: WorkerLoad) -> bool:
        cfg = self.cfg
        decode_busy = (
            cfg.busy_decode_threshold is not None
            and card.total_kv_blocks > 0
            and load.blocks > cfg.busy_decode_threshold * card.total_kv_blocks
        )
        prefill_busy = (
            cfg.busy_prefill_frac is not None
            and load.prefill_tokens > cfg.busy_prefill_frac * card.max_num_batched_tokens
        )
        return decode_busy or prefill_busy

    async def _admit(self, req: RouteRequest, prompt: _Prompt, workers: Sequence[WorkerCard]) -> RouteDecision:
        """Wait in the admission queue until some worker is not busy, then decide."""
        best = max(self.index.find_matches(prompt.hashes).values(), default=0)
        ticket = self.queue.ticket(req.request_id, max(0, prompt.isl - best * prompt.block_size))
        if self.metrics is not None:
            self.metrics.queued.inc()
        try:
            while True:
                await self.queue.wait(ticket)
                decision = self._decide(req, prompt, workers, self.index.find_matches(prompt.hashes))
                if decision is not None:
                    return decision
        except Exception:
            if self.metrics is not None:
                self.metrics.rejected.inc()
            raise
        finally:
            if self.metrics is not None:
                self.metrics.queued.dec()
            if len(self.queue):
                self.queue.wake()  # capacity may remain for the next waiter: let it re-check

    def _record(self, decision: RouteDecision, prompt: _Prompt) -> None:
        self.index.record(decision.card.instance_id, prompt.hashes)
        if self.metrics is not None:
            self.metrics.overlap.observe(decision.overlap_blocks)
            self.metrics.decisions.labels(decision.card.instance_id).inc()

    def _housekeeping(self) -> None:
        now = self.active.clock()  # expire() compares against entries stamped by this clock
        if now - self._last_housekeeping < _HOUSEKEEPING_EVERY_S:
            return
        self._last_housekeeping = now
        self.active.expire(now)  # the approximate index expires its own entries on every lookup


def _default_index(cfg: KvRouterConfig) -> PrefixIndex:
    """Exact when workers publish KV events; otherwise learned from routing decisions."""
    return KvIndex() if cfg.use_kv_events else ApproxIndex(cfg.approx_ttl)
