"""Native engine: real KV bytes over the KV transfer channel (lightspeed/disagg/transfer.py).

The prefill side registers the pinned blocks with the channel's server, which serves them
straight from the cache; the decode side's client pulls the blocks it lacks into its fresh
blocks (one copy, from the receive buffer into the cache), in the client's own threads, so the
engine keeps stepping its running batch while a transfer lands. The fresh blocks belong to a
request that is not scheduled until the pull is done, so no step reads or writes them meanwhile.

Two ids meet here: the prefill handler's transfer id (what `kv_release` names) and the
channel's own; the channel's coordinates travel to the decode side in `KvTransferParams.channel`.
A pull the channel verified releases the blocks at once, before the decode side's `kv_release`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import msgspec

from lightspeed.disagg.transfer import (
    CacheDestination,
    CacheSource,
    KvTransferClient,
    KvTransferServer,
    TransferClientConfig,
    TransferParams,
    TransferRelease,
    TransferServerConfig,
)
from lightspeed.engine.core import EngineCore
from lightspeed.native.executor import NativeExecutor
from lightspeed.native.kv_transfer import KvCacheOwner
from lightspeed.protocol import KvTransferParams

log = logging.getLogger(__name__)
_decode_channel = msgspec.msgpack.Decoder(TransferParams).decode


class ChannelMover:
    def __init__(
        self, owner: KvCacheOwner, bytes_per_token: int, host: str, timeout_s: float, advertise: str = ""
    ) -> None:
        self.owner = owner
        self.kv_bytes_per_token = bytes_per_token
        # Peers on other hosts dial `advertise` (the bind address may be a wildcard such as 0.0.0.0).
        config = TransferServerConfig(host=host, advertise_host=advertise, pin_timeout_s=timeout_s)
        self.server = KvTransferServer(config)
        self.client = KvTransferClient(TransferClientConfig(retries=2))
        self._channel_ids: dict[str, str] = {}  # our transfer id -> the channel's
        self._ours: dict[str, str] = {}  # the channel's transfer id -> ours
        # Set by the prefill side: release our transfer id (the channel verified a pull).
        self.on_released: Callable[[str], object] | None = None

    @classmethod
    def for_core(cls, core: EngineCore, host: str, timeout_s: float, advertise: str = "") -> ChannelMover:
        executor = core.executor
        if not isinstance(executor, NativeExecutor):
            raise TypeError("ChannelMover needs the native executor's KV cache")
        runner = executor.runner
        block_bytes = sum(cache[:, :1].numel() * cache.element_size() for cache in runner.kv_caches)
        return cls(runner, block_bytes // runner.block_size, host, timeout_s, advertise)

    async def start(self) -> None:
        await self.server.start()

    async def offer(self, transfer_id: str, block_ids: Sequence[int], block_hashes: Sequence[int]) -> bytes:
        params = self.server.register(CacheSource(self.owner, block_ids), on_release=self._released)
        self._channel_ids[transfer_id] = params.transfer_id
        self._ours[params.transfer_id] = transfer_id
        return msgspec.msgpack.encode(params)

    def withdraw(self, transfer_id: str) -> None:
        channel_id = self._channel_ids.pop(transfer_id, None)
        if channel_id is not None:
            self._ours.pop(channel_id, None)
            self.server.cancel(channel_id)

    def _released(self, release: TransferRelease) -> None:
        ours = self._ours.pop(release.transfer_id, None)
        if ours is None:
            return  # we withdrew it ourselves
        self._channel_ids.pop(ours, None)
        if self.on_released is not None:
            self.on_released(ours)

    async def pull(self, params: KvTransferParams, positions: Sequence[int], dest_block_ids: Sequence[int]) -> None:
        channel = _decode_channel(params.channel)
        result = await self.client.pull(channel, CacheDestination(self.owner, dest_block_ids), list(positions))
        log.debug(
            "pulled %d blocks (%d bytes) of %s by %s in %.1f ms",
            result.num_blocks,
            result.nbytes,
            params.transfer_id,
            result.mode,
            result.seconds * 1e3,
        )

    async def close(self) -> None:
        await self.server.close()
        self.client.close()
