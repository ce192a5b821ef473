"""Route a request, send it to its worker, and track its load while it streams.

The selector *chooses*; this module *sends*: it applies the routing overrides every mode
honours (a pinned worker, a session's worker), records the decision's load in `ActiveLoad`,
encodes the request onto the request plane, decodes the streamed `LLMEngineOutput` frames, and
keeps the active set accurate (prefill done at the first token, freed when the stream ends
however it ends).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence

import msgspec

from lightspeed.protocol import LLMEngineOutput, PreprocessedRequest, WorkerCard
from lightspeed.router.active import ActiveLoad
from lightspeed.router.selector import (
    RouteDecision,
    RouteRequest,
    WorkerSelector,
    pick_pinned,
)
from lightspeed.router.session import SessionAffinity
from lightspeed.runtime.request_plane import RequestPlaneClient

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(LLMEngineOutput)


class PushRouter:
    def __init__(
        self,
        client: RequestPlaneClient,
        selector: WorkerSelector,
        active: ActiveLoad,
        sessions: SessionAffinity | None = None,
    ) -> None:
        self._client = client
        self.selector = selector
        self.active = active
        self.sessions = sessions if sessions is not None else SessionAffinity()

    async def route(self, req: RouteRequest, workers: Sequence[WorkerCard]) -> RouteDecision:
        """Choose a worker and record the request's load on it (release with `release`)."""
        if req.pinned_worker is not None:
            decision = self.selector.decision_for(req, pick_pinned(req, workers))
        else:
            decision = self._session_decision(req, workers) or await self.selector.route(req, workers)
        if req.session_id is not None:
            self.sessions.bind(req.session_id, decision.card.instance_id)
        self.active.add(
            req.request_id, decision.card.instance_id, decision.prefill_tokens, decision.blocks, decision.hashes
        )
        return decision

    def release(self, request_id: str) -> None:
        self.active.free(request_id)

    def remove_worker(self, instance_id: str) -> None:
        self.active.remove_worker(instance_id)
        self.sessions.remove_worker(instance_id)
        self.selector.remove_worker(instance_id)

    async def generate(
        self, decision: RouteDecision, request: PreprocessedRequest
    ) -> AsyncGenerator[LLMEngineOutput, None]:
        """Stream the worker's outputs; raises WorkerLost / WorkerError from the plane."""
        rid = request.request_id
        card = decision.card
        stream = None
        try:
            stream = await self._client.stream(card.address, card.endpoint, _encoder.encode(request))
            first = True
            async for payload in stream:
                if first:
                    self.active.prefill_done(rid)
                    first = False
                yield _decoder.decode(payload)
        finally:
            self.active.free(rid)
            if stream is not None:
                await stream.aclose()

    def _session_decision(self, req: RouteRequest, workers: Sequence[WorkerCard]) -> RouteDecision | None:
        if req.session_id is None:
            return None
        bound = self.sessions.lookup(req.session_id)
        for card in workers:
            if card.instance_id == bound:
                return self.selector.decision_for(req, card)
        return None  # new session, or its worker left: route normally and bind the new choice
