"""Send a routed request to its worker and track its load while it streams.

The selector *chooses*; this module *sends*: it encodes the request onto the request plane,
decodes the streamed `LLMEngineOutput` frames, and keeps `ActiveLoad` accurate (prefill done at
the first token, freed when the stream ends however it ends).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import msgspec

from lightspeed.protocol import LLMEngineOutput, PreprocessedRequest, WorkerCard
from lightspeed.router.active import ActiveLoad
from lightspeed.router.selector import RouteRequest, WorkerSelector, pick_pinned
from lightspeed.runtime.request_plane import RequestPlaneClient

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(LLMEngineOutput)


class PushRouter:
    def __init__(self, client: RequestPlaneClient, selector: WorkerSelector, active: ActiveLoad) -> None:
        self._client = client
        self._selector = selector
        self.active = active

    def choose(self, req: RouteRequest, workers: Sequence[WorkerCard]) -> WorkerCard:
        if req.pinned_worker is not None:
            return pick_pinned(req, workers)
        return self._selector.select(req, workers)

    async def generate(
        self, card: WorkerCard, request: PreprocessedRequest
    ) -> AsyncIterator[LLMEngineOutput]:
        """Stream the worker's outputs; raises WorkerLost / WorkerError from the plane."""
        rid = request.request_id
        self.active.add(rid, card.instance_id, len(request.token_ids))
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
