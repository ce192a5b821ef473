"""Decode side of disaggregation: pull the prompt's KV, release the prefill side, decode.

The request arrives as prompt + the first token (sampled by the prefill worker) with the
prefill worker's `kv_transfer_params`. Its locally cached prefix is reused; only the blocks
after it are pulled, into fresh blocks, while the engine keeps stepping its other requests
(the pull is a task of its own, the loading request is not scheduled). Then the prefill side
is told to release, and the request decodes from the first token on.

Anything that makes the KV unusable (no room, another block size, hashes that do not match the
prompt, a pull that keeps failing: the prefill worker died, the bytes came corrupted) ends in a
local prefill of the same request on this worker: slower, never wrong.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Sequence

import msgspec

from lightspeed.disagg.mover import KvMover
from lightspeed.disagg.prefill import wire_output
from lightspeed.engine.core import EngineCore, RequestStream
from lightspeed.protocol import KvRelease, KvTransferParams, LLMEngineOutput, PreprocessedRequest
from lightspeed.runtime.request_plane import RequestPlaneClient

log = logging.getLogger(__name__)
_encode = msgspec.msgpack.Encoder().encode
_decode_bool = msgspec.msgpack.Decoder(bool).decode


class DecodeHandler:
    def __init__(self, core: EngineCore, mover: KvMover, client: RequestPlaneClient, pull_attempts: int = 3) -> None:
        if pull_attempts < 1:
            raise ValueError(f"pull_attempts must be >= 1; got {pull_attempts}")
        self.core = core
        self.mover = mover
        self.pull_attempts = pull_attempts
        self.client = client  # to the prefill workers' request planes (kv_release)
        self.num_pulled = 0  # requests whose KV arrived from a prefill worker
        self.num_reused_tokens = 0  # prompt tokens of those requests found cached here instead
        self.num_local_fallbacks = 0  # requests prefilled here after all
        self._releases: set[asyncio.Task[None]] = set()

    async def generate(self, request: PreprocessedRequest) -> AsyncGenerator[LLMEngineOutput, None]:
        params = request.kv_transfer_params
        assert params is not None and not params.do_remote_decode
        local = msgspec.structs.replace(request, kv_transfer_params=None)
        stream = await self._admit(local, params)
        try:
            async for out in stream:
                yield wire_output(out)
        finally:
            await stream.aclose()

    async def _admit(self, request: PreprocessedRequest, params: KvTransferParams) -> RequestStream:
        """The request's stream, its KV pulled or (when that cannot work) to be prefilled here."""
        reason = self._incompatible(request, params)
        admitted = None if reason else self.core.add_prefilled_request(request)
        if admitted is None:
            self._release_remote(params)
            return self._local(request, reason or "no free KV blocks")
        stream, num_hit, fresh = admitted
        rid = request.request_id
        loading = self.core.scheduler.loading[rid][0]
        if loading.block_hashes[: len(params.block_hashes)] != params.block_hashes:
            self.core.fail_loading(rid)
            self._release_remote(params)
            self.num_local_fallbacks += 1
            log.warning("request %s: remote KV hashes do not match its prompt; prefilling locally", rid)
            return stream
        first = num_hit // params.block_size
        try:
            pulled = await self._pull(params, range(first, len(params.block_ids)), fresh)
        except BaseException:  # cancelled: the consumer left; the stream's close frees our blocks
            self._release_remote(params)
            await stream.aclose()
            raise
        self._release_remote(params)
        if pulled:
            self.num_reused_tokens += num_hit
            self.core.finish_loading(rid)
        else:
            self.num_local_fallbacks += 1
            self.core.fail_loading(rid)
        return stream

    def _incompatible(self, request: PreprocessedRequest, params: KvTransferParams) -> str:
        """Why the remote KV cannot be used here ("" when it can)."""
        bs = self.core.config.block_size
        if params.block_size != bs:
            return f"block size {params.block_size} != {bs}"
        if params.num_tokens != len(request.token_ids) - 1 or params.num_tokens < 1:
            return f"{params.num_tokens} KV tokens for a request of {len(request.token_ids)} tokens"
        if len(params.block_ids) != -(-params.num_tokens // bs):
            return f"{len(params.block_ids)} blocks for {params.num_tokens} tokens"
        return ""

    def _local(self, request: PreprocessedRequest, reason: str) -> RequestStream:
        self.num_local_fallbacks += 1
        log.warning("request %s: not using remote KV (%s); prefilling locally", request.request_id, reason)
        return self.core.add_request(request)

    async def _pull(self, params: KvTransferParams, positions: range, fresh: Sequence[int]) -> bool:
        """Pull with retries; False when the KV cannot be had (then nothing was imported)."""
        if not positions:
            self.num_pulled += 1
            return True  # everything was cached here already
        for attempt in range(1, self.pull_attempts + 1):
            try:
                await self.mover.pull(params, positions, fresh)
                self.num_pulled += 1
                return True
            except asyncio.CancelledError:
                raise
            except Exception as err:
                log.warning(
                    "KV pull %s from %s failed (attempt %d/%d): %s",
                    params.transfer_id,
                    params.prefill_worker,
                    attempt,
                    self.pull_attempts,
                    err,
                )
                if not getattr(err, "retryable", True):
                    break
        return False

    def _release_remote(self, params: KvTransferParams) -> None:
        """Tell the prefill worker to free the pinned blocks, in the background (best effort:
        a prefill worker that is gone has nothing left to free, its deadline covers a lost call)."""
        task = asyncio.create_task(self._send_release(params))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _send_release(self, params: KvTransferParams) -> None:
        try:
            await self.release_remote(params)
        except Exception as err:
            log.info("kv_release %s to %s failed: %s", params.transfer_id, params.prefill_worker, err)

    async def release_remote(self, params: KvTransferParams) -> bool:
        """`kv_release` on the prefill worker: True if it still held the transfer (and freed
        it now). Raises WorkerLost when the prefill worker cannot be reached."""
        stream = await self.client.stream(params.control_address, "kv_release", _encode(KvRelease(params.transfer_id)))
        released = False
        async for payload in stream:
            released = _decode_bool(payload)
        return released

    async def close(self) -> None:
        for task in list(self._releases):
            task.cancel()
        await asyncio.gather(*self._releases, return_exceptions=True)
        await self.client.close()
