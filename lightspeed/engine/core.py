"""The engine step loop: schedule -> execute -> update, fanning results out to request streams.

One `EngineCore` drives one scheduler + KV cache with one executor (the native model runner or the
mocker's timing model). It sleeps on an event while idle, so an idle worker costs nothing, and
keeps per-step Python work proportional to the batch, because at high mocker speedups the step
itself takes ~0 s and this loop is the whole cost.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from lightspeed.engine.config import EngineConfig
from lightspeed.engine.kv_cache_manager import KVCacheManager
from lightspeed.engine.request import Request
from lightspeed.engine.scheduler import Scheduler, SchedulerStats
from lightspeed.engine.step_clock import StepClock
from lightspeed.engine.types import EngineCoreOutput, Executor, SchedulerOutput
from lightspeed.protocol import FinishReason, KvEventData, KvStored, PreprocessedRequest
from lightspeed.runtime.clock import WALL_CLOCK, Clock

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StepInfo:
    """What one forward pass did, for forward-pass metrics and the planner."""

    num_prefill_tokens: int
    num_decode_tokens: int
    num_seqs: int
    step_seconds: float  # wall time of schedule + execute + update
    kv_usage: float
    modelled_seconds: float | None = None  # the executor's timing model, where it has one
    lag_seconds: float = 0.0  # wall - modelled over the current busy period (step_clock.py)


def engine_request(config: EngineConfig, request: PreprocessedRequest) -> Request:
    """The scheduler's view of a worker request (ValueError if it can never run); shared with
    the replay simulation, which drives a scheduler without this core's event loop."""
    return Request(
        request,
        config.block_size,
        config.max_model_len,
        hash_blocks=config.enable_prefix_caching,
        vocab_size=config.vocab_size,
    )


KvEventsCallback = Callable[[list[KvEventData]], None]
StepCallback = Callable[[StepInfo], None]


class RequestStream:
    """Async iterator over one request's outputs; ends after the output with a finish reason.

    Closing it early (`aclose()`, or the consuming task being cancelled) aborts the request so
    its KV blocks are freed at once. So does dropping it unfinished: `async for` never closes
    its iterator, so a consumer generator that is closed at a `yield` just lets go of the
    stream, and the core notices through a weak reference.
    """

    __slots__ = ("__weakref__", "_core", "_done", "_items", "_waiter", "request_id")

    def __init__(self, request_id: str, core: EngineCore) -> None:
        self.request_id = request_id
        self._core: EngineCore | None = core
        self._items: collections.deque[EngineCoreOutput] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._done = False  # the final output was queued, or the stream was closed

    def push(self, output: EngineCoreOutput) -> None:
        self._items.append(output)
        if output.finish_reason is not None:
            self._done = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> EngineCoreOutput:
        while not self._items:
            if self._done:
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            except asyncio.CancelledError:
                await self.aclose()
                raise
            finally:
                self._waiter = None
        output = self._items.popleft()
        if output.finish_reason is not None:
            self._items.clear()
            self._detach()
        return output

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            if self._core is not None:
                self._core.abort(self.request_id, notify=False)
        self._items.clear()
        self._detach()

    def _detach(self) -> None:
        self._done = True
        self._core = None


class EngineCore:
    """Owns the scheduler and KV cache of one engine and runs them against an executor.

    `executor.execute()` must actually suspend (an `await` that yields to the loop) or the
    request plane starves; the mocker always does, a CPU-bound runner should use a thread.
    KV events go to `on_kv_events` in order (the worker numbers them); without a callback they
    queue for `take_kv_events()`. `on_step` receives a `StepInfo` after every executed step.
    """

    def __init__(
        self,
        config: EngineConfig,
        executor: Executor,
        *,
        on_kv_events: KvEventsCallback | None = None,
        on_step: StepCallback | None = None,
        clock: Clock = WALL_CLOCK,
    ) -> None:
        self.config = config
        self._now = clock.now
        self.executor = executor
        self.kv = KVCacheManager(config.num_gpu_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.kv)
        self.on_kv_events = on_kv_events
        self.on_step = on_step
        # Weak, so a stream its consumer dropped can be collected (and its request aborted).
        self._streams: dict[str, tuple[weakref.ref[RequestStream], weakref.finalize[[str], RequestStream]]]
        self._streams = {}
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._pending_events: list[KvEventData] = []
        self._dropped: list[str] = []
        self.clock = StepClock()

    # ------------------------------------------------------------------ requests

    def add_request(self, request: PreprocessedRequest, *, hold_kv: bool = False) -> RequestStream:
        """Queue a request; returns its output stream. ValueError if it can never run.

        `hold_kv`: when the length cap ends it, its KV blocks stay referenced and the last
        output names them (`held`) until `release_held` (disaggregated prefill)."""
        if self._stopping:
            raise RuntimeError("engine core is stopping")
        engine_req = engine_request(self.config, request)
        engine_req.hold_kv = hold_kv
        self.scheduler.add_request(engine_req)
        return self._open_stream(request.request_id)

    def add_prefilled_request(self, request: PreprocessedRequest) -> tuple[RequestStream, int, list[int]] | None:
        """Admit a request whose KV for all but its last token arrives from another worker:
        returns its stream, the tokens already cached here, and the fresh block ids to fill;
        then call `finish_loading` (or `fail_loading`). None when the cache has no room now."""
        if self._stopping:
            raise RuntimeError("engine core is stopping")
        engine_req = engine_request(self.config, request)
        admitted = self.scheduler.add_prefilled(engine_req, engine_req.num_tokens - 1)
        if admitted is None:
            return None
        return self._open_stream(request.request_id), admitted[0], admitted[1]

    def finish_loading(self, request_id: str) -> bool:
        """The KV arrived: the request decodes from its last token on."""
        done = self.scheduler.finish_loading(request_id)
        self._drain_kv_events()
        self._wakeup.set()
        return done

    def fail_loading(self, request_id: str) -> bool:
        """The KV will not arrive: the request is prefilled here instead."""
        done = self.scheduler.fail_loading(request_id)
        self._wakeup.set()
        return done

    def release_held(self, request_id: str) -> bool:
        return self.scheduler.release_held(request_id)

    def _open_stream(self, request_id: str) -> RequestStream:
        stream = RequestStream(request_id, self)
        finalizer = weakref.finalize(stream, self._stream_dropped, request_id)
        finalizer.atexit = False
        self._streams[request_id] = (weakref.ref(stream), finalizer)
        self._wakeup.set()
        return stream

    def abort(self, request_id: str, *, notify: bool = True) -> bool:
        """Stop a request and free its blocks; its stream ends with CANCELLED if `notify`."""
        stream = self._unregister(request_id)
        aborted = self.scheduler.abort_request(request_id)
        if stream is not None and notify:
            stream.push(EngineCoreOutput(request_id, [], finish_reason=FinishReason.CANCELLED))
        if aborted:
            self._drain_kv_events()
        return aborted

    def _unregister(self, request_id: str) -> RequestStream | None:
        entry = self._streams.pop(request_id, None)
        if entry is None:
            return None
        ref, finalizer = entry
        finalizer.detach()  # the id may be reused; a later GC must not abort the new request
        return ref()

    def _stream_dropped(self, request_id: str) -> None:
        # Runs inside garbage collection, which can strike in the middle of a scheduler loop:
        # only note the id here, the step loop aborts it at a safe point.
        self._dropped.append(request_id)

    def _reap_dropped(self) -> None:
        dropped, self._dropped = self._dropped, []
        for request_id in dropped:
            entry = self._streams.get(request_id)
            if entry is None or entry[0]() is not None:
                continue  # already finished, or the id now belongs to a newer live request
            del self._streams[request_id]
            logger.debug("stream of %s dropped unfinished; aborting", request_id)
            self.scheduler.abort_request(request_id)

    # ------------------------------------------------------------------ loop

    async def run(self) -> None:
        """Step until `stop()`; on exit every unfinished request ends with CANCELLED."""
        try:
            while not self._stopping:
                if not self.scheduler.has_unfinished():
                    self.clock.idle()
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                await self.step()
        finally:
            self._finish_all(FinishReason.CANCELLED)

    def stop(self) -> None:
        self._stopping = True
        self._wakeup.set()

    async def step(self) -> None:
        """One schedule -> execute -> update round; a failing executor fails the whole batch."""
        started = self._now()
        self.clock.begin(started)
        if self._dropped:
            self._reap_dropped()
        sched = self.scheduler.schedule()
        self._drain_kv_events()
        if sched.is_empty:
            self.clock.idle()  # waiting on arrivals or aborts is not falling behind the model
            await asyncio.sleep(0)  # nothing fits now; let aborts/arrivals run before retrying
            return
        try:
            result = await self.executor.execute(sched)
            outputs = self.scheduler.update_from_output(sched, result)
        except Exception:
            logger.exception("engine step failed; failing %d requests", len(self.scheduler.requests))
            self.clock.idle()
            self._finish_all(FinishReason.ERROR)
            return
        self._drain_kv_events()
        self._dispatch(outputs)
        ended = self._now()
        self.clock.end(ended, result.modelled_seconds)
        self._report_step(sched, ended - started, result.modelled_seconds)

    def _dispatch(self, outputs: list[EngineCoreOutput]) -> None:
        streams = self._streams
        for output in outputs:
            if output.finish_reason is None:
                entry = streams.get(output.request_id)
                stream = entry[0]() if entry is not None else None
            else:
                stream = self._unregister(output.request_id)
            if stream is not None:
                stream.push(output)

    def _report_step(self, sched: SchedulerOutput, seconds: float, modelled: float | None) -> None:
        if self.on_step is None:
            return
        info = StepInfo(
            num_prefill_tokens=sched.num_prefill_tokens,
            num_decode_tokens=sched.num_decode_tokens,
            num_seqs=len(sched.seqs),
            step_seconds=seconds,
            kv_usage=sched.kv_usage,
            modelled_seconds=modelled,
            lag_seconds=self.clock.lag,
        )
        try:
            self.on_step(info)
        except Exception:  # a metrics hook must never stop the engine
            logger.exception("on_step callback failed")

    def _finish_all(self, reason: FinishReason) -> None:
        for request_id in self.scheduler.finish_all(reason):
            stream = self._unregister(request_id)
            if stream is not None:
                stream.push(EngineCoreOutput(request_id, [], finish_reason=reason))
        self._drain_kv_events()

    # ------------------------------------------------------------------ KV events and stats

    def _drain_kv_events(self) -> None:
        events = self.kv.take_events()
        if not events:
            return
        if self.on_kv_events is not None:
            try:
                self.on_kv_events(events)
            except Exception:  # subscribers recover from lost events via dump + event-id gaps
                logger.exception("on_kv_events callback failed; %d events dropped", len(events))
        else:
            self._pending_events.extend(events)

    def take_kv_events(self) -> list[KvEventData]:
        """Drain events recorded while no `on_kv_events` callback was set, oldest first."""
        self._drain_kv_events()
        events, self._pending_events = self._pending_events, []
        return events

    def dump_kv_events(self) -> list[KvStored]:
        """Every cached block as Stored events (the answer to a subscriber's gap request)."""
        return self.kv.dump_cached()

    def reset_prefix_cache(self) -> bool:
        done = self.kv.reset_prefix_cache()
        self._drain_kv_events()
        return done

    def stats(self) -> SchedulerStats:
        return self.scheduler.stats()

    @property
    def num_unfinished(self) -> int:
        return len(self.scheduler.requests)
