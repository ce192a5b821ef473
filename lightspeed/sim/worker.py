"""One simulated mocker worker: the production scheduler and KV cache, stepped by the event heap.

This mirrors `EngineCore.step` (schedule -> execute -> update, draining KV events after the
schedule and after the update) without its event loop: `start_step` runs the schedule and
returns when the step's tokens leave, `finish_step` folds the step back in at that moment. The
step time is the mocker's (`MockerTiming.phase_seconds`, i.e. `PerfModel`) and the output tokens
are drawn by the mocker's own sampler (`MockerExecutor.sample`).

Timing follows the live mocker (mocker/executor.py): a step's prefill phase starts once the
previous step's decode phase is over (its tokens left at the *start* of that decode phase) and
no earlier than the schedule; its tokens leave when its prefill phase ends. A busy engine
schedules the next step the moment the previous one's tokens are out, so arrivals during the
pending decode phase wait for the step after.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lightspeed.engine.config import EngineConfig
from lightspeed.engine.core import engine_request
from lightspeed.engine.kv_cache_manager import KVCacheManager
from lightspeed.engine.scheduler import Scheduler
from lightspeed.engine.types import EngineCoreOutput, ModelRunnerOutput, SchedulerOutput
from lightspeed.mocker.executor import MockerExecutor
from lightspeed.protocol import KvEvent, PerfModel, PreprocessedRequest

KvEventSink = Callable[[list[KvEvent]], None]


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One executed step, as forward-pass metrics report it."""

    num_prefill_tokens: int
    num_decode_tokens: int
    num_seqs: int
    kv_usage: float
    modelled_seconds: float


class SimWorker:
    """A mocker worker in virtual time. KV events are numbered per worker from 1, as the worker
    process numbers them before publishing, and handed to `on_kv_events` at once."""

    def __init__(
        self,
        worker_id: str,
        config: EngineConfig,
        speedup_ratio: float,
        on_kv_events: KvEventSink,
        vocab_size: int = 49152,
    ) -> None:
        self.worker_id = worker_id
        self.config = config
        self.kv = KVCacheManager(config.num_gpu_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.kv)
        self.sampler = MockerExecutor(config, speedup_ratio=speedup_ratio, vocab_size=vocab_size, seed=config.seed)
        self.on_kv_events = on_kv_events
        self._event_id = 0
        self._in_flight: SchedulerOutput | None = None
        self._sampled: dict[str, int] = {}
        self._decode_until = 0.0  # end of the previous step's decode phase (tokens already out)
        self.last_step: StepRecord | None = None

    @property
    def perf(self) -> PerfModel:
        return self.sampler.timing.perf

    @property
    def busy(self) -> bool:
        """A step is in flight (its tokens have not left yet)."""
        return self._in_flight is not None

    @property
    def num_unfinished(self) -> int:
        return len(self.scheduler.requests)

    def add_request(self, request: PreprocessedRequest) -> None:
        """Queue a request (ValueError when it can never run, as the live engine refuses it)."""
        self.scheduler.add_request(engine_request(self.config, request))

    def start_step(self, now: float) -> float | None:
        """Schedule the next step at `now`; returns when its tokens leave, or None when there is
        nothing to run (the engine goes idle until the next arrival)."""
        if self._in_flight is not None:
            raise RuntimeError(f"worker {self.worker_id}: a step is already in flight")
        if not self.scheduler.has_unfinished():
            return None
        sched = self.scheduler.schedule()
        self._drain_kv_events()
        if sched.is_empty:
            return None
        self._sampled = self.sampler.sample(sched)
        prefill_s, decode_s = self.sampler.timing.phase_seconds(
            sched.num_prefill_tokens, sched.kv_usage, bool(self._sampled)
        )
        start = max(now, self._decode_until)
        emit = start + prefill_s
        self._decode_until = emit + decode_s
        self._in_flight = sched
        self.last_step = StepRecord(
            sched.num_prefill_tokens, sched.num_decode_tokens, len(sched.seqs), sched.kv_usage, prefill_s + decode_s
        )
        return emit

    def finish_step(self) -> list[EngineCoreOutput]:
        """The in-flight step's tokens leave: update the scheduler and publish KV events."""
        sched = self._in_flight
        if sched is None:
            raise RuntimeError(f"worker {self.worker_id}: no step in flight")
        self._in_flight = None
        outputs = self.scheduler.update_from_output(sched, ModelRunnerOutput(sampled=self._sampled))
        self._drain_kv_events()
        return outputs

    def _drain_kv_events(self) -> None:
        data = self.kv.take_events()
        if not data:
            return
        events: list[KvEvent] = []
        for item in data:
            self._event_id += 1
            events.append(KvEvent(self.worker_id, self._event_id, item))
        self.on_kv_events(events)
