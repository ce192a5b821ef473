"""A worker's part in disaggregation: the prefill and decode handlers, `kv_release`, the reaper.

Every worker can play either side: `generate` requests that carry `kv_transfer_params` are
dispatched here (a prefill leg when `do_remote_decode` is set, else a decode leg), so a worker's
role only decides which pool the frontend routes it in. The KV mover comes from the engine: the
mocker models the transfer, the native engine moves bytes over the KV channel.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator

import msgspec

from lightspeed.config import WorkerConfig
from lightspeed.disagg.decode import DecodeHandler
from lightspeed.disagg.mover import KvMover, ModelledMover
from lightspeed.disagg.prefill import PrefillHandler
from lightspeed.engine.core import EngineCore
from lightspeed.protocol import KvRelease, LLMEngineOutput, PreprocessedRequest
from lightspeed.runtime.planes import advertise_host
from lightspeed.runtime.request_plane import RequestContext, RequestPlaneClient

log = logging.getLogger(__name__)
_encode = msgspec.msgpack.Encoder().encode
_decode_release = msgspec.msgpack.Decoder(KvRelease).decode


def build_mover(cfg: WorkerConfig, core: EngineCore) -> KvMover:
    if cfg.engine == "mocker":
        return ModelledMover(cfg.kv_transfer.mocker_bytes_per_token, cfg.kv_transfer.bandwidth, cfg.speedup_ratio)
    from lightspeed.disagg.native_mover import ChannelMover  # torch: only for the native engine

    advertise = advertise_host(cfg.host, cfg.advertise_host)  # what peers on other hosts dial
    return ChannelMover.for_core(core, cfg.host, cfg.kv_transfer.timeout, advertise)


class WorkerDisagg:
    def __init__(
        self, core: EngineCore, mover: KvMover, worker_id: str, timeout_s: float, client: RequestPlaneClient
    ) -> None:
        self.mover = mover
        self.prefill = PrefillHandler(core, mover, timeout_s, worker_id, "")
        self.decode = DecodeHandler(core, mover, client)
        if isinstance(mover, ModelledMover):  # its pull ends with the prefill side's release
            mover.release = self.decode.release_remote
        self._reaper: asyncio.Task[None] | None = None

    async def start(self, control_address: str) -> None:
        """`control_address`: this worker's request plane as peers dial it (its card's address)."""
        self.prefill.control_address = control_address
        await self.mover.start()
        self._reaper = asyncio.create_task(self.prefill.held.reap(), name="kv-transfer-reaper")

    def generate(self, request: PreprocessedRequest) -> AsyncGenerator[LLMEngineOutput, None]:
        params = request.kv_transfer_params
        assert params is not None
        return self.prefill.generate(request) if params.do_remote_decode else self.decode.generate(request)

    async def kv_release(self, payload: bytes, ctx: RequestContext) -> AsyncIterator[bytes]:
        """Request-plane endpoint: the decode worker is done with a transfer's blocks."""
        release = _decode_release(payload)
        yield _encode(self.prefill.release(release.transfer_id))

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            await asyncio.gather(self._reaper, return_exceptions=True)
        self.prefill.held.release_all()
        await self.decode.close()
        await self.mover.close()
