"""Shared-memory path: segments hold exactly the views, are reused within a bounded pool, another
process reads them without adopting them, and forged names are refused."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import xxhash

from lightspeed.disagg import transfer_shm
from lightspeed.disagg.transfer_wire import ProtocolError, TransferCorrupt

ROOT = Path(__file__).resolve().parents[3]


def _exists(name: str) -> bool:
    return Path("/dev/shm", name).exists()


def test_host_identity_is_stable_and_names_this_host() -> None:
    ident = transfer_shm.host_identity()
    assert ident == transfer_shm.host_identity()
    assert ident.startswith(os.uname().nodename + "/")
    assert Path("/proc/sys/kernel/random/boot_id").read_text().strip() in ident


def test_fill_copies_the_views_and_returns_their_checksum() -> None:
    parts = [os.urandom(n) for n in (10, 0, 4096, 3)]
    pool = transfer_shm.SegmentPool(max_idle_bytes=1 << 20)
    segment = pool.take(4109)
    try:
        checksum = transfer_shm.fill(segment, (memoryview(p) for p in parts), 4109)
        assert segment.buf is not None
        assert bytes(segment.buf[:4109]) == b"".join(parts)
        assert checksum == xxhash.xxh3_64_intdigest(b"".join(parts))
        with pytest.raises(ValueError, match="more than the 10 bytes"):
            transfer_shm.fill(segment, iter([memoryview(bytes(8)), memoryview(bytes(8))]), 10)
        with pytest.raises(ValueError, match="hold 4 bytes, 10"):
            transfer_shm.fill(segment, iter([memoryview(bytes(4))]), 10)
    finally:
        transfer_shm.discard(segment)
    assert not _exists(segment.name)
    transfer_shm.discard(segment)  # twice is harmless


def test_pool_reuses_the_smallest_fit_and_stays_bounded() -> None:
    pool = transfer_shm.SegmentPool(max_idle_bytes=10_000)
    small, big = pool.take(3000), pool.take(6000)
    pool.give_back(small, reusable=True)
    pool.give_back(big, reusable=True)
    assert pool.take(2000) is small  # smallest that fits
    pool.give_back(small, reusable=True)
    extra = pool.take(7000)  # nothing idle holds 7000: a new one
    assert extra is not big and extra is not small
    pool.give_back(extra, reusable=True)  # 16000 idle > 10000: the largest goes
    assert (_exists(small.name), _exists(big.name), _exists(extra.name)) == (True, True, False)
    unsafe = pool.take(100)
    assert unsafe is small
    pool.give_back(unsafe, reusable=False)  # a puller may still map it: never refilled
    assert not _exists(small.name)
    pool.close()
    assert not _exists(big.name)


def test_another_process_reads_the_segment_and_leaves_it_to_the_creator() -> None:
    payload = os.urandom(100_000)
    pool = transfer_shm.SegmentPool(max_idle_bytes=0)
    segment = pool.take(len(payload))
    checksum = transfer_shm.fill(segment, iter([memoryview(payload)]), len(payload))
    reader = (
        "import sys, xxhash; from lightspeed.disagg import transfer_shm as s; "
        "m = s.Mapping(sys.argv[1], 100000); print(xxhash.xxh3_64_intdigest(m.buf)); m.close()"
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", reader, segment.name], cwd=ROOT, capture_output=True, text=True, check=True
        )
        assert int(out.stdout) == checksum
        assert out.stderr == ""  # no resource-tracker warnings: the reader never adopted the segment
        assert _exists(segment.name)  # and did not unlink it when it exited
    finally:
        pool.give_back(segment, reusable=True)  # over the pool's 0 bytes: discarded
    assert not _exists(segment.name)


def test_mapping_refuses_forged_names_and_short_segments() -> None:
    for name in ("../etc/passwd", "a/b", "", ".hidden"):
        with pytest.raises(ProtocolError, match="not a segment name"):
            transfer_shm.Mapping(name, 10)
    with pytest.raises(FileNotFoundError):
        transfer_shm.Mapping("lightspeed-no-such-segment", 10)
    pool = transfer_shm.SegmentPool(max_idle_bytes=0)
    segment = pool.take(100)
    try:
        with pytest.raises(TransferCorrupt, match="holds 100 bytes, expected 200"):
            transfer_shm.Mapping(segment.name, 200)
    finally:
        transfer_shm.discard(segment)
