"""Frontend side of disaggregation: one client stream from a prefill leg and a decode leg.

The pipeline routes every request to a decode (or aggregated) worker as usual, KV-aware over
that pool, counting the blocks each one already holds. Then the conditional policy
(`policy.py`) decides where the prefill runs. Local: the request goes to the decode worker whole.
Remote: the router picks a prefill worker (KV-aware over the prefill pool: same index, same cost,
only those candidates), which computes the prompt, samples the first token and pins the KV; that
token goes to the client at once, and the decode worker gets prompt + first token with the
transfer params, pulls the blocks it does not cache, releases the prefill side and streams the
rest. Each decision is counted on /metrics by reason.

A prefill leg that fails (the worker died, or its stream ended without a token) costs only
time: the decode worker prefills the request itself. A decode leg that fails is the pipeline's
business as for any request (migration). The first token never comes twice: once it was
yielded, a lost decode leg continues from prompt + tokens so far, like any migrated stream.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Callable, Sequence

import msgspec
from prometheus_client import CollectorRegistry, Counter

from lightspeed.config import DisaggOptions
from lightspeed.disagg.policy import PolicyConfig, PrefillContext, decide
from lightspeed.errors import Overloaded, WorkerError, WorkerLost
from lightspeed.protocol import (
    KvRelease,
    KvTransferParams,
    LLMEngineOutput,
    PreprocessedRequest,
    WorkerCard,
    WorkerRole,
)
from lightspeed.router.push_router import PushRouter
from lightspeed.router.selector import RouteDecision, RouteRequest, RouterOverrides
from lightspeed.runtime.request_plane import RequestPlaneClient

log = logging.getLogger(__name__)
_encode = msgspec.msgpack.Encoder().encode
PREFILL_SUFFIX = "-prefill"  # the prefill leg's request id: its own entry in the active set


class DisaggFlow:
    def __init__(
        self,
        router: PushRouter,
        client: RequestPlaneClient,
        opts: DisaggOptions | None = None,
        registry: CollectorRegistry | None = None,
        report_down: Callable[[str], None] | None = None,
    ) -> None:
        opts = opts or DisaggOptions()
        self.router = router
        self.client = client
        self.policy = PolicyConfig(opts.max_local_prefill_tokens, opts.max_local_prefill_frac, opts.conditional)
        self.busy_frac = opts.prefill_busy_frac
        self.report_down = report_down or (lambda _instance_id: None)
        self.decisions = Counter(
            "lightspeed_frontend_disagg_decisions",
            "Where prefills ran (conditional disaggregation), by reason",
            ["reason"],
            registry=registry,
        )
        self.fallbacks = Counter(
            "lightspeed_frontend_disagg_fallbacks",
            "Remote prefills that failed and were prefilled on the decode worker instead",
            registry=registry,
        )

    @staticmethod
    def split_pin(workers: dict[str, WorkerCard], pinned: str | None) -> tuple[str | None, str | None]:
        """A pinned worker as (decode pin, prefill pin): naming a prefill worker pins the prefill."""
        card = workers.get(pinned) if pinned is not None else None
        if card is not None and card.role == WorkerRole.PREFILL:
            return None, pinned
        return pinned, None

    def outputs(
        self,
        prefill_pool: Sequence[WorkerCard],
        decision: RouteDecision,
        request: PreprocessedRequest,
        pinned_prefill: str | None = None,
        overrides: RouterOverrides | None = None,
    ) -> AsyncGenerator[LLMEngineOutput, None]:
        """The request's outputs: straight from the decode worker, or via a prefill worker."""
        pool = [c for c in prefill_pool if c.block_size == decision.card.block_size]
        if pinned_prefill is not None and all(c.instance_id != pinned_prefill for c in pool):
            raise Overloaded(f"worker instance {pinned_prefill!r} is not reachable")
        ctx = PrefillContext(
            isl=len(request.token_ids),
            decode_overlap_blocks=decision.overlap_blocks,
            block_size=decision.card.block_size,
            prefill_workers=len(pool),
            prefill_all_busy=self._all_busy(pool),
            pinned_prefill=pinned_prefill is not None,
            max_tokens=request.stop.max_tokens,
        )
        verdict = decide(ctx, self.policy)
        self.decisions.labels(verdict.reason.value).inc()
        if not verdict.remote:
            return self.router.generate(decision, request)
        return self._remote(pool, decision, request, pinned_prefill, overrides)

    def _all_busy(self, pool: Sequence[WorkerCard]) -> bool:
        if self.busy_frac <= 0 or not pool:
            return False
        active = self.router.active
        return all(active.get(c.instance_id).prefill_tokens > self.busy_frac * c.max_num_batched_tokens for c in pool)

    async def _remote(
        self,
        pool: Sequence[WorkerCard],
        decision: RouteDecision,
        request: PreprocessedRequest,
        pinned: str | None,
        overrides: RouterOverrides | None,
    ) -> AsyncGenerator[LLMEngineOutput, None]:
        rid, decode_id = request.request_id, decision.card.instance_id
        # The decode worker computes no prefill now: its active entry holds the blocks only.
        self.router.active.add(rid, decode_id, 0, decision.blocks, decision.hashes)
        first = await self._prefill(pool, request, pinned, overrides)
        if first is None:
            self.fallbacks.inc()
            self.router.active.add(rid, decode_id, decision.prefill_tokens, decision.blocks, decision.hashes)
            async for out in self.router.generate(decision, request):
                yield out
            return
        params = first.kv_transfer_params
        if params is None:  # the first token ended it (EOS), or an error: nothing to decode
            yield first
            return
        finished = False
        try:
            yield LLMEngineOutput(
                token_ids=first.token_ids, num_cached_tokens=first.num_cached_tokens, logprobs=first.logprobs
            )
            async for out in self.router.generate(decision, decode_request(request, first.token_ids, params)):
                finished = finished or out.finish_reason is not None  # the consumer may stop at it
                yield out
        finally:
            # The client left (or a stop string hit) on the first token, or the decode leg failed:
            # free the pinned blocks now instead of at their deadline (a no-op if already pulled).
            if not finished:
                await self._release(params)

    async def _prefill(
        self,
        pool: Sequence[WorkerCard],
        request: PreprocessedRequest,
        pinned: str | None,
        overrides: RouterOverrides | None,
    ) -> LLMEngineOutput | None:
        """The prefill leg's one output (first token + transfer params), or None if it failed."""
        prid = request.request_id + PREFILL_SUFFIX
        route = RouteRequest(prid, request.token_ids, pinned, None, request.lora_name, overrides)
        chosen = await self.router.route(route, pool)
        leg = msgspec.structs.replace(
            request, request_id=prid, kv_transfer_params=KvTransferParams(do_remote_decode=True)
        )
        outputs = self.router.generate(chosen, leg)
        try:
            async for out in outputs:
                if out.token_ids or out.finish_reason is not None or out.error is not None:
                    return out
        except (WorkerLost, WorkerError) as err:
            if isinstance(err, WorkerLost):
                self.report_down(chosen.card.instance_id)
            log.warning(
                "prefill of %s on %s failed (%s); prefilling on the decode worker", prid, chosen.card.instance_id, err
            )
        finally:
            await outputs.aclose()
            self.router.release(prid)
        return None

    async def _release(self, params: KvTransferParams) -> None:
        try:
            stream = await self.client.stream(
                params.control_address, "kv_release", _encode(KvRelease(params.transfer_id))
            )
            async for _ in stream:
                pass
        except Exception as err:  # the prefill worker's deadline frees the blocks anyway
            log.info("kv_release of %s failed: %s", params.transfer_id, err)


def decode_request(request: PreprocessedRequest, first: list[int], params: KvTransferParams) -> PreprocessedRequest:
    """The decode leg: prompt + the prefill worker's token(s), limits reduced by them."""
    stop = request.stop
    n = len(first)
    return msgspec.structs.replace(
        request,
        token_ids=request.token_ids + first,
        stop=msgspec.structs.replace(
            stop,
            max_tokens=None if stop.max_tokens is None else stop.max_tokens - n,
            min_tokens=max(0, stop.min_tokens - n),
        ),
        kv_transfer_params=params,
    )
