"""Same-host fast path: the payload goes through a POSIX shared-memory segment, not TCP.

Both ends compare `host_identity()`: equal identities mean the same kernel and the same
/dev/shm, so a segment one end creates the other can open. The prefill side fills a segment
from its pool with the requested blocks (hashing each view while it is still in cache) and
names it; the decode side maps it, verifies the checksum and imports straight out of it.
Segments are reused across pulls because creating and first touching fresh shared pages costs
more than copying into warm ones; only the creator ever unlinks them.
"""

from __future__ import annotations

import contextlib
import functools
import mmap
import os
import re
import socket
import threading
from collections.abc import Iterable
from multiprocessing import shared_memory
from pathlib import Path

import xxhash

from lightspeed.disagg.transfer_wire import ProtocolError, TransferCorrupt

SHM_DIR = Path("/dev/shm")
# What `shared_memory.SharedMemory` names look like; anything else from a peer is refused, so a
# forged name cannot point outside /dev/shm.
_SEGMENT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}")


@functools.cache
def host_identity() -> str:
    """Hostname, boot id and the /dev/shm mount: equal only where a segment is shareable."""
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        shm = os.stat(SHM_DIR)
    except OSError:
        return ""  # no /dev/shm or /proc (not Linux): never claim the fast path
    return f"{socket.gethostname()}/{boot_id}/{shm.st_dev}:{shm.st_ino}"


def fill(segment: shared_memory.SharedMemory, views: Iterable[memoryview], nbytes: int) -> int:
    """Copy the concatenated `views` (exactly `nbytes`) to the segment's start; their xxh3_64."""
    buf = segment.buf
    assert buf is not None
    hasher = xxhash.xxh3_64()
    offset = 0
    for view in views:
        end = offset + len(view)
        if end > nbytes:
            raise ValueError(f"views hold more than the {nbytes} bytes announced")
        buf[offset:end] = view
        hasher.update(buf[offset:end])  # just written: still in cache
        offset = end
    if offset != nbytes:
        raise ValueError(f"views hold {offset} bytes, {nbytes} announced")
    return hasher.intdigest()


def discard(segment: shared_memory.SharedMemory) -> None:
    """Unmap and unlink (the creator's side); safe if it is already gone."""
    segment.close()
    with contextlib.suppress(FileNotFoundError):
        segment.unlink()


class SegmentPool:
    """The creator's segments: idle ones are kept (up to `max_idle_bytes`) for the next pull."""

    def __init__(self, max_idle_bytes: int) -> None:
        self._max_idle_bytes = max_idle_bytes
        self._idle: list[shared_memory.SharedMemory] = []
        self._lock = threading.Lock()  # sender threads take and return segments

    def take(self, nbytes: int) -> shared_memory.SharedMemory:
        """The smallest idle segment that holds `nbytes`, else a new one of exactly that size."""
        with self._lock:
            fits = [s for s in self._idle if s.size >= nbytes]
            if fits:
                best = min(fits, key=lambda s: s.size)
                self._idle.remove(best)
                return best
        return shared_memory.SharedMemory(create=True, size=nbytes)

    def give_back(self, segment: shared_memory.SharedMemory, reusable: bool) -> None:
        """Keep a segment for reuse, or discard it when not `reusable` (a puller may still map
        it) or when the pool is full (largest idle segments are dropped first)."""
        if not reusable:
            discard(segment)
            return
        with self._lock:
            self._idle.append(segment)
            self._idle.sort(key=lambda s: s.size)
            dropped = []
            while self._idle and sum(s.size for s in self._idle) > self._max_idle_bytes:
                dropped.append(self._idle.pop())
        for old in dropped:
            discard(old)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for segment in idle:
            discard(segment)


class Mapping:
    """A segment another process created, mapped here. Unlike `SharedMemory(name=...)` before
    Python 3.13 it is never registered with a resource tracker, which would unlink the creator's
    segment when this process exits (or unregister the creator's own entry in a shared tracker)."""

    def __init__(self, name: str, nbytes: int) -> None:
        if not _SEGMENT_NAME.fullmatch(name):
            raise ProtocolError(f"shared-memory name {name!r} is not a segment name")
        fd = os.open(SHM_DIR / name, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            if size < nbytes:
                raise TransferCorrupt(f"segment {name} holds {size} bytes, expected {nbytes}")
            # MAP_POPULATE maps every page in one call instead of one fault per page.
            self._mmap = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
        finally:
            os.close(fd)
        self.buf = memoryview(self._mmap)

    def close(self) -> None:
        self.buf.release()
        self._mmap.close()
