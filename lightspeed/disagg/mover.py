"""How KV bytes move between workers: the seam between the disaggregation flow and a channel.

The prefill side `offer`s pinned blocks (and gets the channel's opaque coordinates to hand to
the decode side); the decode side `pull`s a subset of them into its own fresh blocks. The
mocker moves nothing: `ModelledMover` sleeps for the bytes a real transfer would move at the
configured bandwidth, so fleet experiments price the transfer without a model. The native
engine moves real tensor bytes (`native_mover.ChannelMover`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from lightspeed.protocol import KvTransferParams


class KvMover(Protocol):
    kv_bytes_per_token: int
    # Set by the prefill side: called with a transfer id the channel saw pulled and verified
    # (such a channel frees the blocks without waiting for the decode side's kv_release).
    on_released: Callable[[str], object] | None

    async def start(self) -> None: ...

    async def offer(self, transfer_id: str, block_ids: Sequence[int], block_hashes: Sequence[int]) -> bytes:
        """Make pinned blocks pullable; returns the channel's coordinates (b"": none needed)."""
        ...

    def withdraw(self, transfer_id: str) -> None:
        """The blocks are released: the channel must stop serving them."""
        ...

    async def pull(self, params: KvTransferParams, positions: Sequence[int], dest_block_ids: Sequence[int]) -> None:
        """Copy the blocks at `positions` of the transfer into `dest_block_ids` (same order).
        Raises on failure; nothing partial may be decoded from."""
        ...

    async def close(self) -> None: ...


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """K and V of one token across all layers."""
    for name, value in (
        ("num_layers", num_layers),
        ("num_kv_heads", num_kv_heads),
        ("head_dim", head_dim),
        ("dtype_bytes", dtype_bytes),
    ):
        if value <= 0:
            raise ValueError(f"{name} must be > 0; got {value}")
    return 2 * num_layers * num_kv_heads * head_dim * dtype_bytes


def transfer_seconds(num_tokens: int, bytes_per_token: int, bandwidth: float, speedup_ratio: float = 1.0) -> float:
    """Modelled wall seconds to move `num_tokens` tokens' KV at `bandwidth` bytes/s."""
    if bandwidth <= 0:
        raise ValueError(f"kv_transfer_bandwidth must be > 0; got {bandwidth}")
    return num_tokens * bytes_per_token / bandwidth / speedup_ratio


class TransferGone(Exception):
    """The prefill side no longer holds the transfer (it died, restarted or timed it out)."""

    retryable = False


@dataclass
class ModelledMover:
    """Mocker: no bytes, a sleep of (pulled tokens x bytes per token) / bandwidth, scaled by the
    mocker's speedup like every other modelled time. The control flow is the real one: the pull
    ends by asking the prefill worker to release the blocks (`release`, its `kv_release`), and a
    prefill side that no longer holds them fails the pull, as the byte channel would."""

    kv_bytes_per_token: int
    bandwidth: float
    speedup_ratio: float = 1.0
    release: Callable[[KvTransferParams], Awaitable[bool]] | None = field(default=None, repr=False)
    num_pulls: int = 0
    modelled_seconds: float = 0.0
    on_released: Callable[[str], object] | None = field(default=None, repr=False)

    async def start(self) -> None:
        pass

    async def offer(self, transfer_id: str, block_ids: Sequence[int], block_hashes: Sequence[int]) -> bytes:
        return b""

    def withdraw(self, transfer_id: str) -> None:
        pass

    async def pull(self, params: KvTransferParams, positions: Sequence[int], dest_block_ids: Sequence[int]) -> None:
        seconds = transfer_seconds(
            pulled_tokens(params, positions), params.kv_bytes_per_token, self.bandwidth, self.speedup_ratio
        )
        await asyncio.sleep(seconds)
        if self.release is not None and not await self.release(params):
            raise TransferGone(f"prefill worker {params.prefill_worker} no longer holds {params.transfer_id}")
        self.num_pulls += 1
        self.modelled_seconds += seconds

    async def close(self) -> None:
        pass


def pulled_tokens(params: KvTransferParams, positions: Sequence[int]) -> int:
    """Tokens the pulled blocks hold (the prompt's last block may be partial)."""
    bs = params.block_size
    return sum(max(0, min(bs, params.num_tokens - p * bs)) for p in positions)
