"""KV transfer data channel between a prefill worker and a decode worker (DESIGN §6).

Prefill side::

    server = KvTransferServer(TransferServerConfig(pin_timeout_s=30.0))
    await server.start()
    params = server.register(CacheSource(runner, block_ids), on_release=free_pinned, block_hashes=hashes)
    # hand params.to_builtins() to the decode side (e.g. as kv_transfer_params)

Decode side::

    client = KvTransferClient(TransferClientConfig(retries=3))
    params = TransferParams.from_builtins(kv_transfer_params)
    result = await client.pull(params, CacheDestination(runner, fresh_block_ids), positions=missing)

The transfer stays pinned until a pull of it is verified, it times out, is cancelled, or the
server closes; `on_release` (a `TransferRelease`) then tells the owner to free the blocks.
Payload bytes never travel on the request plane: one request frame, then large checksummed
frames (`sendmsg` from the cache, `recv_into` one preallocated buffer), or one shared-memory
segment when both workers share a host. This module is the public API; the parts live in
transfer_wire (messages, errors), transfer_blocks (sources, destinations), transfer_server,
transfer_client, transfer_stream (socket I/O), transfer_shm and transfer_registry.
"""

from __future__ import annotations

from lightspeed.disagg.transfer_blocks import (
    BufferDestination,
    BufferSource,
    CacheDestination,
    CacheSource,
    KvDestination,
    KvSource,
    cache_header,
)
from lightspeed.disagg.transfer_client import KvTransferClient, TransferClientConfig
from lightspeed.disagg.transfer_registry import ReleaseCallback
from lightspeed.disagg.transfer_server import KvTransferServer, TransferServerConfig
from lightspeed.disagg.transfer_wire import (
    KvTransferError,
    LayoutMismatch,
    ProtocolError,
    PullResult,
    ReleaseReason,
    TransferCorrupt,
    TransferMode,
    TransferNotFound,
    TransferParams,
    TransferRelease,
    TransferUnavailable,
    block_nbytes,
)
from lightspeed.native.kv_transfer import KvBlocksHeader

__all__ = [
    "BufferDestination",
    "BufferSource",
    "CacheDestination",
    "CacheSource",
    "KvBlocksHeader",
    "KvDestination",
    "KvSource",
    "KvTransferClient",
    "KvTransferError",
    "KvTransferServer",
    "LayoutMismatch",
    "ProtocolError",
    "PullResult",
    "ReleaseCallback",
    "ReleaseReason",
    "TransferClientConfig",
    "TransferCorrupt",
    "TransferMode",
    "TransferNotFound",
    "TransferParams",
    "TransferRelease",
    "TransferServerConfig",
    "TransferUnavailable",
    "block_nbytes",
    "cache_header",
]
