"""Sources and destinations: views straight into the cache in the exporter's layout, imports that
match `import_blocks`, and refusals of bad block ids and layouts."""

from __future__ import annotations

import pytest
import torch

from lightspeed.disagg.transfer_blocks import (
    BufferDestination,
    BufferSource,
    CacheDestination,
    CacheSource,
    cache_header,
    runs,
)
from lightspeed.disagg.transfer_wire import LayoutMismatch, block_nbytes, with_blocks
from lightspeed.native.kv_transfer import export_blocks, import_blocks
from tests.unit.disagg.test_transfer_fixtures import FakeCache, block_bytes, random_cache, zero_cache_like


def _payload_of(export: bytes, nbytes: int) -> bytes:
    return export[len(export) - nbytes :]


def test_runs_coalesce_consecutive_slots_in_order() -> None:
    assert runs([4, 5, 6, 9, 1, 2, 2]) == [(4, 3), (9, 1), (1, 2), (2, 1)]
    assert runs([7]) == [(7, 1)]
    assert runs([]) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cache_source_views_are_the_export_payload(dtype: torch.dtype) -> None:
    cache = random_cache(20, layers=4, block_size=3, kv_heads=2, head_dim=5, dtype=dtype)
    ids = [11, 12, 13, 0, 19, 5, 6]
    source = CacheSource(cache, ids)
    assert source.header == cache_header(cache, 7)
    views = list(source.views(range(7)))
    assert len(views) == 4 * 2 * 4  # runs (11-13), (0), (19), (5-6) per layer and K/V
    payload = b"".join(bytes(v) for v in views)
    assert payload == _payload_of(export_blocks(cache, ids), len(payload))


def test_cache_source_views_alias_the_cache() -> None:
    cache = random_cache(4)
    views = list(CacheSource(cache, [2]).views([0]))
    cache.kv_caches[0][0, 2].fill_(1.5)  # no copy: the view sees the write
    assert torch.frombuffer(bytearray(views[0]), dtype=torch.float32).eq(1.5).all()


def test_subset_views_follow_the_requested_order() -> None:
    cache = random_cache(10, dtype=torch.bfloat16)
    source = CacheSource(cache, [9, 3, 4, 7])
    payload = b"".join(bytes(v) for v in source.views([3, 0, 2]))
    assert payload == _payload_of(export_blocks(cache, [7, 9, 4]), len(payload))


def test_buffer_source_serves_exported_bytes() -> None:
    cache = random_cache(12, dtype=torch.bfloat16, seed=3)
    header = cache_header(cache, 5)
    exported = export_blocks(cache, [1, 3, 5, 7, 9])
    source = BufferSource(header, _payload_of(exported, 5 * block_nbytes(header)))
    subset = b"".join(bytes(v) for v in source.views([4, 1]))
    assert subset == _payload_of(export_blocks(cache, [9, 3]), len(subset))
    with pytest.raises(ValueError, match="payload has 10 bytes"):
        BufferSource(header, b"x" * 10)


def test_cache_destination_imports_like_import_blocks() -> None:
    src = random_cache(16, dtype=torch.bfloat16, seed=4)
    exported = export_blocks(src, [2, 8, 9])
    ours, theirs = zero_cache_like(src), zero_cache_like(src)
    dest = CacheDestination(ours, [15, 0, 4])
    assert dest.expected_header(3) == cache_header(src, 3)
    dest.land(memoryview(bytearray(_payload_of(exported, 3 * block_nbytes(cache_header(src, 1))))))
    import_blocks(theirs, [15, 0, 4], exported)
    assert all(torch.equal(a, b) for a, b in zip(ours.kv_caches, theirs.kv_caches))
    assert block_bytes(ours, [15, 0, 4]) == block_bytes(src, [2, 8, 9])


def test_destinations_state_the_layout_they_accept() -> None:
    cache = random_cache(8, head_dim=4)
    with pytest.raises(LayoutMismatch, match="5 blocks offered for 2"):
        CacheDestination(cache, [0, 1]).expected_header(5)
    header = cache_header(cache, 6)
    assert BufferDestination(header).expected_header(2) == with_blocks(header, 2)


@pytest.mark.parametrize(
    ("ids", "message"),
    [([], "block_ids is empty"), ([8], r"in \[0, 8\)"), ([-1], r"in \[0, 8\)"), ([1, 1], "duplicates")],
)
def test_bad_block_ids_are_refused(ids: list[int], message: str) -> None:
    cache = random_cache(8)
    with pytest.raises(ValueError, match=message):
        CacheSource(cache, ids)
    with pytest.raises(ValueError, match=message):
        CacheDestination(cache, ids)


def test_bad_positions_are_refused() -> None:
    source = CacheSource(random_cache(8), [1, 2])
    for positions, message in (([], "positions is empty"), ([2], r"in \[0, 2\)"), ([0, 0], "duplicates")):
        with pytest.raises(ValueError, match=message):
            list(source.views(positions))


def test_non_contiguous_caches_are_refused() -> None:
    cache = random_cache(8)
    strided = FakeCache([c.transpose(3, 4) for c in cache.kv_caches], 8)
    with pytest.raises(ValueError, match="contiguous CPU caches"):
        CacheSource(strided, [0])
