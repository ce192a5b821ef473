"""Where transferred KV bytes come from and where they land, without copying them on the way.

A source yields the payload of any subset of its blocks as memoryviews straight into the
KV cache (or an exported buffer), coalescing runs of consecutive blocks, so the sender can
`sendmsg` them as they are. A destination checks the layout and imports a verified payload
from the receive buffer into its cache blocks: the one copy on the decode side.

Both sides see each layer's cache as [2 (K, V), blocks, chunk] bytes, where a chunk is one
block's K (or V) of one layer; the payload is [layers, 2, requested blocks, chunk].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from lightspeed.disagg.transfer_wire import LayoutMismatch, check_header, chunk_nbytes, with_blocks
from lightspeed.native.kv_transfer import KvBlocksHeader, KvCacheOwner


class KvSource(Protocol):
    """The prefill side's bytes of one transfer (its blocks stay pinned while registered)."""

    @property
    def header(self) -> KvBlocksHeader:
        """Layout of all the transfer's blocks (`num_blocks` = how many)."""
        ...

    def views(self, positions: Sequence[int]) -> list[memoryview]:
        """The payload of the blocks at `positions` (in that order), as views in wire order."""
        ...


class KvDestination(Protocol):
    """The decode side's target of one pull."""

    def expected_header(self, num_blocks: int) -> KvBlocksHeader:
        """The layout this destination accepts for `num_blocks` blocks."""
        ...

    def land(self, payload: memoryview) -> None:
        """Import a verified payload; `payload` is only valid during the call."""
        ...


def runs(slots: Sequence[int]) -> list[tuple[int, int]]:
    """(start, length) of each run of consecutive slots, in order: one view per run."""
    out: list[tuple[int, int]] = []
    for slot in slots:
        if out and out[-1][0] + out[-1][1] == slot:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((slot, 1))
    return out


class _LayeredViews:
    """Byte views of per-layer [2, capacity, chunk] arrays, addressed by slot."""

    def __init__(self, layers: list[memoryview], capacity: int, chunk: int) -> None:
        self._layers = layers
        self._capacity = capacity
        self._chunk = chunk

    def views(self, slots: Sequence[int]) -> list[memoryview]:
        chunk = self._chunk
        spans = [(start * chunk, (start + length) * chunk) for start, length in runs(slots)]
        out: list[memoryview] = []
        for layer in self._layers:
            for kv in (0, 1):
                base = kv * self._capacity * chunk
                # A comprehension: a scattered transfer has one view per block and layer.
                out += [layer[base + lo : base + hi] for lo, hi in spans]
        return out


def check_positions(positions: Sequence[int], num_blocks: int) -> None:
    """ValueError unless `positions` names distinct blocks of a `num_blocks`-block transfer."""
    if not positions:
        raise ValueError("positions is empty")
    if min(positions) < 0 or max(positions) >= num_blocks:
        raise ValueError(f"positions must be in [0, {num_blocks})")
    if len(set(positions)) != len(positions):
        raise ValueError("positions has duplicates")


def cache_header(owner: KvCacheOwner, num_blocks: int) -> KvBlocksHeader:
    """The `KvBlocksHeader` of `num_blocks` blocks of `owner`'s cache (same rule as the exporter)."""
    cache = owner.kv_caches[0]
    _, _, block_size, kv_heads, head_dim = cache.shape
    dtype = str(cache.dtype).removeprefix("torch.")
    return KvBlocksHeader(len(owner.kv_caches), num_blocks, block_size, kv_heads, head_dim, dtype)


def _byte_view(cache: torch.Tensor) -> memoryview:
    if cache.device.type != "cpu" or not cache.is_contiguous():
        raise ValueError("KV transfer needs contiguous CPU caches")
    return cache.view(torch.uint8).numpy().data.cast("B")


def _check_block_ids(owner: KvCacheOwner, block_ids: Sequence[int]) -> None:
    if not block_ids:
        raise ValueError("block_ids is empty")
    if min(block_ids) < 0 or max(block_ids) >= owner.num_blocks:
        raise ValueError(f"block_ids must be in [0, {owner.num_blocks})")
    if len(set(block_ids)) != len(block_ids):
        raise ValueError("block_ids has duplicates")


class CacheSource:
    """Blocks of a live CPU KV cache, read in place (the owner keeps them pinned until release)."""

    def __init__(self, owner: KvCacheOwner, block_ids: Sequence[int]) -> None:
        _check_block_ids(owner, block_ids)
        self._block_ids = list(block_ids)
        self._header = cache_header(owner, len(self._block_ids))
        check_header(self._header)
        # The tensors are held so the views' memory outlives the owner dropping its caches.
        self._caches = list(owner.kv_caches)
        layers = [_byte_view(cache) for cache in self._caches]
        self._views = _LayeredViews(layers, owner.num_blocks, chunk_nbytes(self._header))

    @property
    def header(self) -> KvBlocksHeader:
        return self._header

    def views(self, positions: Sequence[int]) -> list[memoryview]:
        check_positions(positions, len(self._block_ids))
        return self._views.views([self._block_ids[p] for p in positions])


class BufferSource:
    """Blocks already laid out in wire order in one buffer (e.g. `export_blocks` output's payload)."""

    def __init__(self, header: KvBlocksHeader, payload: memoryview | bytes | bytearray) -> None:
        check_header(header)
        view = memoryview(payload).cast("B")
        chunk = chunk_nbytes(header)
        layer_bytes = 2 * header.num_blocks * chunk
        if len(view) != header.num_layers * layer_bytes:
            raise ValueError(f"payload has {len(view)} bytes, header describes {header.num_layers * layer_bytes}")
        self._header = header
        layers = [view[i * layer_bytes : (i + 1) * layer_bytes] for i in range(header.num_layers)]
        self._views = _LayeredViews(layers, header.num_blocks, chunk)

    @property
    def header(self) -> KvBlocksHeader:
        return self._header

    def views(self, positions: Sequence[int]) -> list[memoryview]:
        check_positions(positions, self._header.num_blocks)
        return self._views.views(positions)


class CacheDestination:
    """Fresh blocks of a CPU KV cache; a landed payload is copied into them (the one copy)."""

    def __init__(self, owner: KvCacheOwner, block_ids: Sequence[int]) -> None:
        _check_block_ids(owner, block_ids)
        self._owner = owner
        self._block_ids = list(block_ids)
        self._index = torch.tensor(self._block_ids, dtype=torch.int64)

    def expected_header(self, num_blocks: int) -> KvBlocksHeader:
        if num_blocks != len(self._block_ids):
            raise LayoutMismatch(f"{num_blocks} blocks offered for {len(self._block_ids)} destination blocks")
        return cache_header(self._owner, num_blocks)

    def land(self, payload: memoryview) -> None:
        cache = self._owner.kv_caches[0]
        shape = (len(self._owner.kv_caches), 2, len(self._block_ids), *cache.shape[2:])
        # frombuffer aliases the receive buffer: no copy until index_copy_ writes the cache.
        values = torch.frombuffer(payload, dtype=torch.uint8).view(cache.dtype).view(shape)
        with torch.inference_mode():
            for layer, layer_cache in enumerate(self._owner.kv_caches):
                layer_cache.index_copy_(1, self._index, values[layer])


class BufferDestination:
    """Keeps a copy of the landed payload (tests, tools): accepts exactly `header`'s layout."""

    def __init__(self, header: KvBlocksHeader) -> None:
        check_header(header)
        self._header = header
        self.payload: bytes | None = None

    def expected_header(self, num_blocks: int) -> KvBlocksHeader:
        return with_blocks(self._header, num_blocks)

    def land(self, payload: memoryview) -> None:
        self.payload = bytes(payload)
