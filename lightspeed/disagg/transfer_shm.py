"""Same-host fast path: the payload goes through one POSIX shared-memory segment, not TCP.

Both ends compare `host_identity()`: equal identities mean the same kernel and the same
/dev/shm, so a segment one end creates the other can open. The prefill side creates a segment
per pull, copies the requested blocks into it and publishes its checksum; the decode side
verifies the checksum and imports straight out of the segment. The creator unlinks it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import sys
from collections.abc import Iterable
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path

import xxhash

# Segments this process created and has not discarded. Attaching to one of them (both ends in
# one process, as in tests) must leave its resource-tracker registration to the creator.
_created: set[str] = set()


@functools.cache
def host_identity() -> str:
    """Hostname, boot id and the /dev/shm mount: equal only where a segment is shareable."""
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        shm = os.stat("/dev/shm")
    except OSError:
        return ""  # no /dev/shm or /proc (not Linux): never claim the fast path
    return f"{socket.gethostname()}/{boot_id}/{shm.st_dev}:{shm.st_ino}"


def create_filled(views: Iterable[memoryview], nbytes: int) -> tuple[shared_memory.SharedMemory, int]:
    """A new segment holding the concatenated `views` and the xxh3_64 of those `nbytes`."""
    segment = shared_memory.SharedMemory(create=True, size=nbytes)
    _created.add(segment.name)
    try:
        buf = segment.buf
        assert buf is not None
        offset = 0
        for view in views:
            end = offset + len(view)
            if end > nbytes:
                raise ValueError(f"views hold more than the {nbytes} bytes announced")
            buf[offset:end] = view
            offset = end
        if offset != nbytes:
            raise ValueError(f"views hold {offset} bytes, {nbytes} announced")
        return segment, xxhash.xxh3_64_intdigest(buf[:nbytes])
    except BaseException:
        discard(segment)
        raise


def attach(name: str) -> shared_memory.SharedMemory:
    """Open a segment another process created (OSError if it is not visible here)."""
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name=name, track=False)
    segment = shared_memory.SharedMemory(name=name)
    if name in _created:
        return segment
    # Before 3.13 an attached segment is registered with this process's resource tracker, which
    # would unlink the creator's segment when we exit; the creator owns its lifetime.
    resource_tracker.unregister("/" + segment.name, "shared_memory")
    return segment


def discard(segment: shared_memory.SharedMemory) -> None:
    """Unmap and unlink (the creator's side); safe if the other end already unlinked it."""
    _created.discard(segment.name)
    segment.close()
    with contextlib.suppress(FileNotFoundError):
        segment.unlink()
