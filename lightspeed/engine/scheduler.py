"""Continuous-batching scheduler: decides which tokens of which requests run in the next step.

There are no prefill/decode phases, only token counts (as in vLLM v1): each request has
`num_tokens` (prompt + outputs) and `num_computed_tokens`, and a step computes some of the
difference within a token budget. A new prompt, a chunk of a long prompt, a decode step and the
recompute of a preempted request are all the same operation.

Each step: running requests first (oldest first), each getting as many tokens as the budget
allows; if one cannot get a block, the most recently added running request is preempted
(recompute: its blocks are freed and it goes back to the front of the queue, keeping its output
tokens). Then, if nothing was preempted, waiting requests are admitted FCFS up to `max_num_seqs`,
each starting after its longest cached prefix and chunked when the budget runs short.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

from lightspeed.engine.config import EngineConfig
from lightspeed.engine.kv_cache_manager import KVCacheManager
from lightspeed.engine.request import Request, RequestStatus, finished_status
from lightspeed.engine.types import (
    EngineCoreOutput,
    HeldBlocks,
    ModelRunnerOutput,
    ScheduledSeq,
    SchedulerOutput,
)
from lightspeed.protocol import FinishReason

logger = logging.getLogger(__name__)

_HIT_WINDOW = 1000  # requests over which the prefix hit rate is measured


@dataclass(frozen=True, slots=True)
class SchedulerStats:
    num_running: int
    num_waiting: int
    active_blocks: int  # referenced by requests
    total_blocks: int
    cached_blocks: int  # holding a reusable prefix, in use or evictable
    kv_usage: float  # active / total
    prefix_hit_rate: float  # cached / prompt tokens over the last requests admitted
    num_preemptions: int


class Scheduler:
    def __init__(self, config: EngineConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        # Requests whose prompt KV is arriving from a prefill worker: blocks allocated, not
        # scheduled (and not in `requests`, so an engine waiting only on them sleeps).
        self.loading: dict[str, tuple[Request, int]] = {}
        self._finished_ids: list[str] = []
        self._preempted_in_step = False
        self._num_preemptions = 0
        self._hits: deque[tuple[int, int]] = deque()
        self._hit_tokens = 0
        self._query_tokens = 0

    # ------------------------------------------------------------------ requests

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def abort_request(self, request_id: str) -> bool:
        """Drop a request wherever it is and free its blocks. False if it is unknown/finished."""
        loading = self.loading.pop(request_id, None)
        if loading is not None:
            self.kv.free(loading[0])
            loading[0].status = RequestStatus.FINISHED_ABORTED
            return True
        request = self.requests.pop(request_id, None)
        if request is None:
            return False
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self.kv.free(request)
        request.status = RequestStatus.FINISHED_ABORTED
        self._finished_ids.append(request_id)
        return True

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ------------------------------------------------------------------ KV from elsewhere

    def add_prefilled(self, request: Request, num_kv_tokens: int) -> tuple[int, list[int]] | None:
        """Admit a request whose KV, all but its last token's, another worker computed (the
        last token is the one that worker sampled).

        Its locally cached prefix is reused; fresh blocks are allocated for the rest and
        returned with the number of cached tokens, for the caller to fill. The request waits
        in `loading` until `finish_loading` (or `fail_loading`: then it is prefilled here).
        None, changing nothing, when the cache has no room for it now.
        """
        rid = request.request_id
        if rid in self.requests or rid in self.loading:
            raise ValueError(f"duplicate request id {rid!r}")
        if num_kv_tokens != request.num_tokens - 1 or num_kv_tokens < 1:
            raise ValueError(f"request {rid}: {num_kv_tokens} KV tokens for {request.num_tokens} tokens")
        computed, num_hit = self.kv.get_computed_blocks(request)  # never past num_kv_tokens
        reserve = self.config.watermark_blocks if self.running else 0
        if not self.kv.allocate_slots(request, num_kv_tokens - num_hit, computed, reserve):
            return None
        request.num_cached_tokens = num_hit
        self._record_hit(num_hit, num_kv_tokens)
        self.loading[rid] = (request, num_kv_tokens)
        return num_hit, list(self.kv.get_block_ids(rid)[num_hit // self.kv.block_size :])

    def finish_loading(self, request_id: str) -> bool:
        """The KV arrived: the request runs from the token after it. False if it was aborted."""
        entry = self.loading.pop(request_id, None)
        if entry is None:
            return False
        request, num_kv_tokens = entry
        request.num_computed_tokens = num_kv_tokens
        # The token after the imported KV was sampled remotely: computing its KV is a decode step.
        request.num_prompt_tokens = num_kv_tokens
        self.kv.cache_blocks(request)
        request.status = RequestStatus.RUNNING
        self.requests[request_id] = request
        self.running.append(request)
        return True

    def fail_loading(self, request_id: str) -> bool:
        """The KV will not arrive: free its blocks and prefill the request here instead."""
        entry = self.loading.pop(request_id, None)
        if entry is None:
            return False
        request = entry[0]
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        self.requests[request_id] = request
        self.waiting.append(request)
        return True

    def release_held(self, request_id: str) -> bool:
        """Free the blocks a finished `hold_kv` request kept for its transfer."""
        return self.kv.release_held(request_id)

    # ------------------------------------------------------------------ schedule

    def schedule(self) -> SchedulerOutput:
        self._preempted_in_step = False
        scheduled: list[tuple[Request, int]] = []
        budget = self._schedule_running(scheduled, self.config.max_num_batched_tokens)
        if not self._preempted_in_step:
            self._schedule_waiting(scheduled, budget)
        return self._build_output(scheduled)

    def _schedule_running(self, scheduled: list[tuple[Request, int]], budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self._allocate_or_preempt(request, num_new):
                break  # the request preempted itself: everything after it is gone too
            scheduled.append((request, num_new))
            budget -= num_new
            i += 1
        return budget

    def _allocate_or_preempt(self, request: Request, num_new: int) -> bool:
        while not self.kv.allocate_slots(request, num_new):
            victim = self.running.pop()
            self._preempt(victim)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.waiting.appendleft(request)
        self._preempted_in_step = True
        self._num_preemptions += 1
        logger.debug("preempted %s (%d tokens)", request.request_id, request.num_tokens)

    def _schedule_waiting(self, scheduled: list[tuple[Request, int]], budget: int) -> None:
        max_seqs = self.config.max_num_seqs
        while self.waiting and budget > 0 and len(self.running) < max_seqs:
            request = self.waiting[0]
            num_new = self._admit(request, budget)
            if num_new == 0:
                break
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled.append((request, num_new))
            budget -= num_new

    def _admit(self, request: Request, budget: int) -> int:
        """Allocate for the head of the queue; returns tokens scheduled (0: it must wait)."""
        computed, num_hit = self.kv.get_computed_blocks(request)
        num_new = request.num_tokens - num_hit
        if num_new > budget:
            if not self.config.enable_chunked_prefill:
                return 0
            num_new = budget
        # The watermark keeps room for running requests to grow; a lone request needs none.
        reserve = self.config.watermark_blocks if self.running else 0
        if not self.kv.allocate_slots(request, num_new, computed, reserve):
            return 0
        request.num_computed_tokens = num_hit
        if request.num_cached_tokens is None:
            request.num_cached_tokens = num_hit
            self._record_hit(num_hit, request.num_prompt_tokens)
        return num_new

    def _record_hit(self, hit: int, query: int) -> None:
        self._hits.append((hit, query))
        self._hit_tokens += hit
        self._query_tokens += query
        if len(self._hits) > _HIT_WINDOW:
            old_hit, old_query = self._hits.popleft()
            self._hit_tokens -= old_hit
            self._query_tokens -= old_query

    def _build_output(self, scheduled: list[tuple[Request, int]]) -> SchedulerOutput:
        seqs: list[ScheduledSeq] = []
        num_prefill = num_decode = 0
        block_ids = self.kv.get_block_ids
        for request, num_new in scheduled:
            start = request.num_computed_tokens
            end = start + num_new
            is_prefill = num_new > 1 or start < request.num_prompt_tokens
            if is_prefill:
                num_prefill += num_new
            else:
                num_decode += num_new
            rid = request.request_id
            # Positional on purpose: this runs once per sequence per step.
            seqs.append(
                ScheduledSeq(
                    rid,
                    request.token_ids[start:end],
                    start,
                    block_ids(rid),
                    end == len(request.token_ids),
                    request.sampling,
                    len(request.output_token_ids),
                    request.banned_token_ids(),
                    is_prefill,
                )
            )
        # An empty step is not executed, so its finished ids wait for the next real one.
        finished: list[str] = []
        if seqs:
            finished, self._finished_ids = self._finished_ids, []
        return SchedulerOutput(
            seqs=seqs,
            finished_request_ids=finished,
            num_prefill_tokens=num_prefill,
            num_decode_tokens=num_decode,
            kv_usage=self.kv.usage,
        )

    # ------------------------------------------------------------------ results

    def update_from_output(self, sched: SchedulerOutput, out: ModelRunnerOutput) -> list[EngineCoreOutput]:
        """Fold a finished step back in: advance progress, append tokens, stop and free."""
        outputs: list[EngineCoreOutput] = []
        any_finished = False
        requests = self.requests
        for seq in sched.seqs:
            request = requests.get(seq.request_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue  # aborted while the step ran
            request.num_computed_tokens += len(seq.token_ids)
            self.kv.cache_blocks(request)
            if not seq.sample:
                continue  # a prefill chunk that is not the last one
            output = self._append_token(request, out.sampled[seq.request_id], out)
            outputs.append(output)
            if output.finish_reason is not None:
                output.held = self._finish(request, output.finish_reason)
                any_finished = True
        if any_finished:
            self.running = [r for r in self.running if r.status == RequestStatus.RUNNING]
        return outputs

    def _append_token(self, request: Request, token: int, out: ModelRunnerOutput) -> EngineCoreOutput:
        request.append_output(token)
        cached: int | None = None
        if not request.cached_reported:
            request.cached_reported = True
            cached = request.num_cached_tokens
        logprob = out.logprobs.get(request.request_id) if out.logprobs else None
        return EngineCoreOutput(
            request_id=request.request_id,
            new_token_ids=[token],
            finish_reason=request.check_stop(),
            num_cached_tokens=cached,
            logprobs=[logprob] if logprob is not None else None,
        )

    def _finish(self, request: Request, reason: FinishReason) -> HeldBlocks | None:
        """Free a request that stopped; it leaves `running` in the caller's batch filter.
        A `hold_kv` request cut by its length cap keeps its blocks (returned) for a transfer."""
        request.status = finished_status(reason)
        held = None
        if request.hold_kv and reason is FinishReason.LENGTH:
            num_tokens = request.num_computed_tokens
            full = min(num_tokens // request.block_size, len(request.block_hashes))
            held = HeldBlocks(self.kv.hold(request), request.block_hashes[:full], num_tokens)
        else:
            self.kv.free(request)
        del self.requests[request.request_id]
        self._finished_ids.append(request.request_id)
        return held

    def finish_all(self, reason: FinishReason) -> list[str]:
        """Stop every request (engine shutdown or a failed step); returns their ids."""
        ids = list(self.requests)
        for request in list(self.requests.values()):
            self._finish(request, reason)
        for request_id in list(self.loading):
            self.abort_request(request_id)
            ids.append(request_id)

        self.running.clear()
        self.waiting.clear()
        return ids

    # ------------------------------------------------------------------ stats

    @property
    def prefix_hit_rate(self) -> float:
        return self._hit_tokens / self._query_tokens if self._query_tokens else 0.0

    def stats(self) -> SchedulerStats:
        pool = self.kv.pool
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            active_blocks=pool.num_active_blocks,
            total_blocks=pool.num_blocks,
            cached_blocks=pool.num_cached_blocks,
            kv_usage=pool.usage,
            prefix_hit_rate=self.prefix_hit_rate,
            num_preemptions=self._num_preemptions,
        )
