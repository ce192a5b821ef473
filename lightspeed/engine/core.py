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
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from lightspeed.engine.config import EngineConfig
from lightspeed.engine.kv_cache_manager import KVCacheManager
from lightspeed.engine.request import Request
from lightspeed.engine.scheduler import Scheduler, SchedulerStats
from lightspeed.engine.types import EngineCoreOutput, Executor, SchedulerOutput
from lightspeed.protocol import FinishReason, KvEventData, KvStored, PreprocessedRequest

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StepInfo:
    """What one forward pass did, for forward-pass metrics and the planner."""

    num_prefill_tokens: int
    num_decode_tokens: int
    num_seqs: int
    step_seconds: float  # wall time of schedule + execute + update
    kv_usage: float


KvEventsCallback = Callable[[list[KvEventData]], None]
StepCallback = Callable[[StepInfo], None]


class RequestStream:
    """Async iterator over one request's outputs; ends after the output with a finish reason.

    Closing it early (`aclose()`, or the consuming task being cancelled) aborts the request so
    its KV blocks are freed at once.
    """

    __slots__ = ("request_id", "_core", "_items", "_waiter", "_done")

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
    def __init__(
        self,
        config: EngineConfig,
        executor: Executor,
        *,
        on_kv_events: KvEventsCallback | None = None,
        on_step: StepCallback | None = None,
    ) -> None:
        self.config = config
        self.executor = executor
        self.kv = KVCacheManager(config.num_gpu_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.kv)
        self.on_kv_events = on_kv_events
        self.on_step = on_step
        self._streams: dict[str, RequestStream] = {}
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._pending_events: list[KvEventData] = []

    # ------------------------------------------------------------------ requests

    def add_request(self, request: PreprocessedRequest) -> AsyncIterator[EngineCoreOutput]:
        """Queue a request; returns its output stream. ValueError if it can never run."""
        if self._stopping:
            raise RuntimeError("engine core is stopping")
        engine_request = Request(
            request, self.config.block_size, self.config.max_model_len,
            hash_blocks=self.config.enable_prefix_caching,
        )  # fmt: skip
        self.scheduler.add_request(engine_request)
        stream = RequestStream(request.request_id, self)
        self._streams[request.request_id] = stream
        self._wakeup.set()
        return stream

    def abort(self, request_id: str, *, notify: bool = True) -> bool:
        """Stop a request and free its blocks; its stream ends with CANCELLED if `notify`."""
        stream = self._streams.pop(request_id, None)
        aborted = self.scheduler.abort_request(request_id)
        if stream is not None and notify:
            stream.push(EngineCoreOutput(request_id, [], finish_reason=FinishReason.CANCELLED))
        if aborted:
            self._drain_kv_events()
        return aborted

    # ------------------------------------------------------------------ loop

    async def run(self) -> None:
        """Step until `stop()`; on exit every unfinished request ends with CANCELLED."""
        try:
            while not self._stopping:
                if not self.scheduler.has_unfinished():
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
        started = time.perf_counter()
        sched = self.scheduler.schedule()
        self._drain_kv_events()
        if sched.is_empty:
            await asyncio.sleep(0)  # nothing fits now; let aborts/arrivals run before retrying
            return
        try:
            result = await self.executor.execute(sched)
            outputs = self.scheduler.update_from_output(sched, result)
        except Exception:
            logger.exception("engine step failed; failing %d requests", len(self.scheduler.requests))
            self._finish_all(FinishReason.ERROR)
            return
        self._drain_kv_events()
        self._dispatch(outputs)
        self._report_step(sched, time.perf_counter() - started)

    def _dispatch(self, outputs: list[EngineCoreOutput]) -> None:
        streams = self._streams
        for output in outputs:
            if output.finish_reason is None:
                stream = streams.get(output.request_id)
            else:
                stream = streams.pop(output.request_id, None)
            if stream is not None:
                stream.push(output)

    def _report_step(self, sched: SchedulerOutput, seconds: float) -> None:
        if self.on_step is None:
            return
        self.on_step(
            StepInfo(
                num_prefill_tokens=sched.num_prefill_tokens,
                num_decode_tokens=sched.num_decode_tokens,
                num_seqs=len(sched.seqs),
                step_seconds=seconds,
                kv_usage=sched.kv_usage,
            )
        )

    def _finish_all(self, reason: FinishReason) -> None:
        for request_id in self.scheduler.finish_all(reason):
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                stream.push(EngineCoreOutput(request_id, [], finish_reason=reason))
        self._drain_kv_events()

    # ------------------------------------------------------------------ KV events and stats

    def _drain_kv_events(self) -> None:
        events = self.kv.take_events()
        if not events:
            return
        if self.on_kv_events is not None:
            self.on_kv_events(events)
        else:
            self._pending_events.extend(events)

    def take_kv_events(self) -> list[KvEventData]:
        """Drain events recorded while no `on_kv_events` callback was set, oldest first."""
        self._drain_kv_events()
        events, self._pending_events = self._pending_events, []
        return events

    def dump_kv_cache(self) -> list[KvStored]:
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
