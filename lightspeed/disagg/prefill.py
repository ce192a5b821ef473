"""Prefill side of disaggregation: compute the prompt, sample the first token, pin the KV.

A request carrying `kv_transfer_params.do_remote_decode` runs with a one-token cap and
`hold_kv`: when the cap ends it, its blocks stay referenced and the last output names them in
`kv_transfer_params` (where to pull, which blocks, their hashes). A first token that really
ends the request (EOS, or a one-token request) pins nothing and is returned as is. The blocks
are released when the decode worker says so (`kv_release`), when the channel reports the pull
acknowledged, or at the deadline (`HeldTransfers`).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncGenerator

import msgspec

from lightspeed.disagg.held import HeldTransfers
from lightspeed.disagg.mover import KvMover
from lightspeed.engine.core import EngineCore
from lightspeed.engine.types import EngineCoreOutput, HeldBlocks
from lightspeed.protocol import KvTransferParams, LLMEngineOutput, PreprocessedRequest

log = logging.getLogger(__name__)


def wire_output(out: EngineCoreOutput, params: KvTransferParams | None = None) -> LLMEngineOutput:
    return LLMEngineOutput(
        token_ids=out.new_token_ids,
        finish_reason=out.finish_reason,
        num_cached_tokens=out.num_cached_tokens,
        logprobs=out.logprobs,
        kv_transfer_params=params,
    )


class PrefillHandler:
    def __init__(
        self, core: EngineCore, mover: KvMover, timeout_s: float, worker_id: str, control_address: str
    ) -> None:
        self.core = core
        self.mover = mover
        self.held = HeldTransfers(self._free, timeout_s)
        mover.on_released = self.release  # a channel that sees a verified pull frees at once
        self.worker_id = worker_id
        self.control_address = control_address

    async def generate(self, request: PreprocessedRequest) -> AsyncGenerator[LLMEngineOutput, None]:
        hold = request.stop.max_tokens != 1
        capped = msgspec.structs.replace(
            request, stop=msgspec.structs.replace(request.stop, max_tokens=1), kv_transfer_params=None
        )
        stream = self.core.add_request(capped, hold_kv=hold)
        try:
            async for out in stream:
                params = None if out.held is None else await self._offer(request.request_id, out.held)
                yield wire_output(out, params)
        finally:
            await stream.aclose()

    async def _offer(self, request_id: str, held: HeldBlocks) -> KvTransferParams:
        """Pin (deadline first, so nothing leaks whatever happens next) and publish the blocks."""
        transfer_id = secrets.token_hex(16)
        self.held.add(transfer_id, request_id, len(held.block_ids))
        try:
            channel = await self.mover.offer(transfer_id, held.block_ids, held.block_hashes)
        except Exception:
            self.held.release(transfer_id)
            raise
        return KvTransferParams(
            transfer_id=transfer_id,
            prefill_worker=self.worker_id,
            control_address=self.control_address,
            channel=channel,
            block_ids=held.block_ids,
            block_hashes=held.block_hashes,
            num_tokens=held.num_tokens,
            block_size=self.core.config.block_size,
            kv_bytes_per_token=self.mover.kv_bytes_per_token,
        )

    def release(self, transfer_id: str) -> bool:
        """Free a transfer's blocks; False if unknown or already released (idempotent)."""
        return self.held.release(transfer_id)

    def _free(self, transfer_id: str, request_id: str) -> None:
        self.mover.withdraw(transfer_id)
        self.core.release_held(request_id)
