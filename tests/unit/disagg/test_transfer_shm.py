"""Shared-memory path: segments hold exactly the views, another process can read them, and only
the creator unlinks them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import xxhash

from lightspeed.disagg import transfer_shm

ROOT = Path(__file__).resolve().parents[3]


def test_host_identity_is_stable_and_names_this_host() -> None:
    ident = transfer_shm.host_identity()
    assert ident == transfer_shm.host_identity()
    assert ident.startswith(os.uname().nodename + "/")
    assert Path("/proc/sys/kernel/random/boot_id").read_text().strip() in ident


def test_segment_holds_the_views_and_their_checksum() -> None:
    parts = [os.urandom(n) for n in (10, 0, 4096, 3)]
    segment, checksum = transfer_shm.create_filled((memoryview(p) for p in parts), 4109)
    try:
        assert segment.buf is not None
        assert bytes(segment.buf[:4109]) == b"".join(parts)
        assert checksum == xxhash.xxh3_64_intdigest(b"".join(parts))
    finally:
        transfer_shm.discard(segment)
    assert not Path("/dev/shm", segment.name).exists()
    transfer_shm.discard(segment)  # twice is harmless


@pytest.mark.parametrize(("sizes", "message"), [((8, 8), "more than the 10 bytes"), ((4,), "hold 4 bytes, 10")])
def test_views_that_do_not_match_the_size_leave_no_segment(sizes: tuple[int, ...], message: str) -> None:
    before = set(os.listdir("/dev/shm"))
    with pytest.raises(ValueError, match=message):
        transfer_shm.create_filled((memoryview(bytes(n)) for n in sizes), 10)
    assert set(os.listdir("/dev/shm")) == before


def test_another_process_reads_the_segment_and_leaves_it_to_the_creator() -> None:
    payload = os.urandom(100_000)
    segment, checksum = transfer_shm.create_filled(iter([memoryview(payload)]), len(payload))
    reader = (
        "import sys, xxhash; from lightspeed.disagg import transfer_shm as s; "
        "seg = s.attach(sys.argv[1]); print(xxhash.xxh3_64_intdigest(seg.buf[:100000])); seg.close()"
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", reader, segment.name], cwd=ROOT, capture_output=True, text=True, check=True
        )
        assert int(out.stdout) == checksum
        assert "leaked" not in out.stderr  # the reader's resource tracker did not adopt the segment
        assert Path("/dev/shm", segment.name).exists()  # and did not unlink it when the reader exited
    finally:
        transfer_shm.discard(segment)


def test_attaching_a_missing_segment_is_an_os_error() -> None:
    with pytest.raises(FileNotFoundError):
        transfer_shm.attach("lightspeed-no-such-segment")
