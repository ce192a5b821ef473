"""Serialize KV cache blocks for disaggregated prefill -> decode hand-off.

Wire format: 4-byte little-endian header length, a msgpack `KvBlocksHeader`, then the raw cache
bytes laid out [layers, 2 (K, V), blocks, block_size, kv_heads, head_dim] in the header's dtype.
The header lets the importer refuse KV from an incompatible model or cache layout instead of
silently decoding garbage.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

import msgspec
import torch

logger = logging.getLogger(__name__)

_LEN_BYTES = 4


class KvBlocksHeader(msgspec.Struct, frozen=True):
    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # torch dtype name, e.g. "float32", "bfloat16"


class KvCacheOwner(Protocol):
    """What this module needs from a model runner."""

    kv_caches: list[torch.Tensor]
    num_blocks: int
    device: torch.device


def _cache_header(owner: KvCacheOwner, num_blocks: int) -> KvBlocksHeader:
    cache = owner.kv_caches[0]
    _, _, block_size, kv_heads, head_dim = cache.shape
    return KvBlocksHeader(
        len(owner.kv_caches), num_blocks, block_size, kv_heads, head_dim, str(cache.dtype).removeprefix("torch.")
    )


def _block_index(owner: KvCacheOwner, block_ids: Sequence[int]) -> torch.Tensor:
    if not block_ids:
        raise ValueError("no blocks given")
    if min(block_ids) < 0 or max(block_ids) >= owner.num_blocks:
        raise ValueError(f"block id out of [0, {owner.num_blocks})")
    return torch.tensor(list(block_ids), dtype=torch.int64, device=owner.device)


def export_blocks(owner: KvCacheOwner, block_ids: Sequence[int]) -> bytes:
    """K and V of `block_ids` (in that order) from every layer."""
    index = _block_index(owner, block_ids)
    header = msgspec.msgpack.encode(_cache_header(owner, len(block_ids)))
    with torch.inference_mode():
        stacked = torch.stack([cache.index_select(1, index) for cache in owner.kv_caches])
        payload = stacked.cpu().contiguous().view(torch.uint8).numpy().tobytes()
    return len(header).to_bytes(_LEN_BYTES, "little") + header + payload


def import_blocks(owner: KvCacheOwner, block_ids: Sequence[int], data: bytes) -> None:
    """Write exported blocks into `block_ids` (same count and order as exported)."""
    header_len = int.from_bytes(data[:_LEN_BYTES], "little")
    header = msgspec.msgpack.decode(data[_LEN_BYTES : _LEN_BYTES + header_len], type=KvBlocksHeader)
    expected = _cache_header(owner, len(block_ids))
    if header != expected:
        raise ValueError(f"incompatible KV blocks: got {header}, cache expects {expected}")
    index = _block_index(owner, block_ids)
    payload = memoryview(data)[_LEN_BYTES + header_len :]
    cache = owner.kv_caches[0]
    shape = (header.num_layers, 2, header.num_blocks, *cache.shape[2:])
    if len(payload) != cache.element_size() * torch.Size(shape).numel():
        raise ValueError(f"KV payload has {len(payload)} bytes, expected shape {shape}")
    # bytearray: torch.frombuffer needs a writable buffer to avoid aliasing read-only memory.
    values = torch.frombuffer(bytearray(payload), dtype=torch.uint8).view(cache.dtype)
    values = values.view(shape).to(owner.device)
    with torch.inference_mode():
        for layer, layer_cache in enumerate(owner.kv_caches):
            layer_cache.index_copy_(1, index, values[layer])
    logger.debug("imported %d KV blocks", len(block_ids))
