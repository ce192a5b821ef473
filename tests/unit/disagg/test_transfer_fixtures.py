"""Shared pieces of the KV transfer tests: random KV caches and a fault-injecting TCP proxy.

(No tests here; the name keeps the file among the transfer tests it serves.)
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import torch


@dataclass
class FakeCache:
    """A `KvCacheOwner` with real tensors in the native runner's layout, filled with noise."""

    kv_caches: list[torch.Tensor]
    num_blocks: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


def random_cache(
    num_blocks: int,
    layers: int = 3,
    block_size: int = 5,
    kv_heads: int = 3,
    head_dim: int = 7,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> FakeCache:
    gen = torch.Generator().manual_seed(seed)
    shape = (2, num_blocks, block_size, kv_heads, head_dim)
    return FakeCache([torch.randn(shape, generator=gen).to(dtype) for _ in range(layers)], num_blocks)


def zero_cache_like(cache: FakeCache, num_blocks: int | None = None) -> FakeCache:
    n = num_blocks or cache.num_blocks
    return FakeCache([torch.zeros((2, n, *c.shape[2:]), dtype=c.dtype) for c in cache.kv_caches], n)


def block_bytes(cache: FakeCache, block_ids: list[int]) -> list[bytes]:
    """Every (layer, K/V) slice of the given blocks, as bytes, for exact comparisons."""
    return [
        layer[kv, block].contiguous().view(torch.uint8).numpy().tobytes()
        for layer in cache.kv_caches
        for kv in (0, 1)
        for block in block_ids
    ]


@dataclass(frozen=True)
class Fault:
    """What the proxy does to one connection's server -> client bytes at byte `offset`."""

    kind: str  # "flip": XOR one byte with 0xFF; "cut": close after `offset` bytes
    offset: int


class FaultyProxy:
    """TCP proxy to a transfer server; connection k suffers `faults[k]` (none past the list)."""

    def __init__(self, target_port: int, faults: list[Fault | None], delay_s: float = 0.0) -> None:
        self.target_port = target_port
        self.faults = faults
        self.delay_s = delay_s  # pause before forwarding each server chunk (a slow link)
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._handlers):  # asyncio.Server.close leaves handlers running
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)
        fault = self.faults[self.connections] if self.connections < len(self.faults) else None
        self.connections += 1
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        up = asyncio.create_task(self._pipe(client_r, server_w, None))
        try:
            await self._pipe(server_r, client_w, fault)
        finally:
            up.cancel()
            for w in (client_w, server_w):
                w.close()
                with contextlib.suppress(OSError):
                    await w.wait_closed()

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, fault: Fault | None) -> None:
        seen = 0
        with contextlib.suppress(OSError):
            while chunk := await src.read(65536):
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                if fault is not None and seen <= fault.offset < seen + len(chunk):
                    at = fault.offset - seen
                    if fault.kind == "cut":
                        dst.write(chunk[:at])
                        await dst.drain()
                        return
                    chunk = chunk[:at] + bytes([chunk[at] ^ 0xFF]) + chunk[at + 1 :]
                seen += len(chunk)
                dst.write(chunk)
                await dst.drain()
