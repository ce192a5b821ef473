"""Blocking socket I/O of the data channel, run on worker threads (never on the event loop).

The sender cuts the payload views into frames of at most `frame_bytes` and writes each with
`sendmsg` (scatter-gather straight from the cache: no staging copy), hashing a frame's views
after they were sent, while they are still in cache, for its trailer. The receiver `recv_into`s
each frame at its place in one preallocated buffer and checks length and checksum as it lands.
"""

from __future__ import annotations

import bisect
import collections
import itertools
import os
import socket
import struct
from collections.abc import Iterator, Sequence
from typing import TypeVar

import xxhash

from lightspeed.disagg.transfer_wire import (
    CONTROL_LEN_BYTES,
    DATA_PREFIX_BYTES,
    DATA_TRAILER_BYTES,
    PullAck,
    PullReply,
    PullRequest,
    TransferCorrupt,
    control_length,
    decode_control,
)

# Linux caps one sendmsg at IOV_MAX buffers; larger lists are sent in batches.
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
_M = TypeVar("_M", PullRequest, PullReply, PullAck)
Buffer = memoryview | bytes
# The receiver asks for at most this much per `recv_into` and hashes each piece as it lands,
# while it is in cache; large enough that per-call overhead stays small.
HASH_SLICE_BYTES = 4 * 1024 * 1024


def frames(views: Sequence[memoryview], frame_bytes: int) -> Iterator[tuple[list[memoryview], int]]:
    """Cut `views` into frames of exactly `frame_bytes` (the last one shorter); yields each
    frame's views and size. Frame edges are found by bisecting the running byte count, so the
    per-view work is done in C: a scattered transfer has one view per block and layer."""
    views = list(filter(len, views))
    ends = list(itertools.accumulate(map(len, views)))
    first, skip = 0, 0  # where the next frame starts: view index, bytes of it already sent
    for frame_start in range(0, ends[-1] if ends else 0, frame_bytes):
        frame_end = min(frame_start + frame_bytes, ends[-1])
        last = bisect.bisect_left(ends, frame_end)
        frame = views[first : last + 1]
        keep = len(views[last]) - (ends[last] - frame_end)  # bytes of the last view in this frame
        frame[-1] = frame[-1][:keep] if keep < len(frame[-1]) else frame[-1]
        if skip:
            frame[0] = frame[0][skip:]
        yield frame, frame_end - frame_start
        first, skip = (last + 1, 0) if keep == len(views[last]) else (last, keep)


def sendmsg_all(sock: socket.socket, buffers: list[Buffer], nbytes: int) -> None:
    """Write the non-empty `buffers` (`nbytes` in all) in order, resuming after partial writes."""
    first = 0
    while True:
        sent = sock.sendmsg(buffers[first : first + IOV_MAX])
        nbytes -= sent
        if nbytes == 0:
            return
        while sent:  # a partial write (or more than IOV_MAX buffers): skip what went out
            size = len(buffers[first])
            if sent >= size:
                sent -= size
                first += 1
            else:
                buffers[first] = memoryview(buffers[first])[sent:]
                sent = 0


def send_frames(sock: socket.socket, views: Sequence[memoryview], frame_bytes: int) -> int:
    """Stream `views` as data frames `[u64 length][body][u64 xxh3_64]`; returns the bytes sent.

    Each frame is hashed right after `sendmsg` copied it out, while it is still in cache; its
    checksum rides in front of the next frame's length.
    """
    trailer = b""
    total = 0
    for frame, size in frames(views, frame_bytes):
        head = trailer + size.to_bytes(DATA_PREFIX_BYTES, "little")
        sendmsg_all(sock, [head, *frame], len(head) + size)
        hasher = xxhash.xxh3_64()
        collections.deque(map(hasher.update, frame), maxlen=0)  # hash every view, looping in C
        trailer = hasher.intdigest().to_bytes(DATA_TRAILER_BYTES, "little")
        total += size
    sock.sendall(trailer)
    return total


def set_io_timeout(sock: socket.socket, seconds: float) -> None:
    """Blocking socket whose every send / receive gives up after `seconds` (kernel timeouts),
    with Nagle off.

    Python's own socket timeout makes the socket non-blocking and polls before each call, so a
    large `sendmsg` goes out in many partial writes; the kernel's keeps one call per frame.
    Nagle would hold the last frame's 8-byte trailer until the peer acknowledges the frame.
    """
    sock.settimeout(None)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    whole = int(seconds)
    timeval = struct.pack("ll", whole, int((seconds - whole) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)


def recv_exact(sock: socket.socket, view: memoryview, hasher: xxhash.xxh3_64 | None = None) -> None:
    """Fill `view` from the socket (hashing each piece as it lands, if asked); TransferCorrupt if
    the peer ends the stream first."""
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got : got + HASH_SLICE_BYTES])
        if n == 0:
            raise TransferCorrupt(f"stream ended after {got} of {len(view)} bytes")
        if hasher is not None:
            hasher.update(view[got : got + n])
        got += n


def recv_frames(sock: socket.socket, dest: memoryview, max_frame_bytes: int) -> None:
    """Receive data frames until `dest` is full, verifying each frame's length and checksum."""
    word = bytearray(DATA_PREFIX_BYTES)
    offset = 0
    while offset < len(dest):
        recv_exact(sock, memoryview(word))
        size = int.from_bytes(word, "little")
        if size == 0 or size > max_frame_bytes or size > len(dest) - offset:
            # A length that does not fit is a corrupted (or forged) prefix: refused, never trusted.
            raise TransferCorrupt(f"data frame of {size} bytes at offset {offset} (limit {max_frame_bytes})")
        hasher = xxhash.xxh3_64()
        recv_exact(sock, dest[offset : offset + size], hasher)
        recv_exact(sock, memoryview(word))
        if hasher.intdigest() != int.from_bytes(word, "little"):
            raise TransferCorrupt(f"checksum mismatch in the frame at offset {offset}")
        offset += size


def recv_control(sock: socket.socket, kind: type[_M]) -> _M:
    """One length-prefixed control frame, bounded before its body is read."""
    prefix = bytearray(CONTROL_LEN_BYTES)
    recv_exact(sock, memoryview(prefix))
    body = bytearray(control_length(bytes(prefix)))
    recv_exact(sock, memoryview(body))
    return decode_control(bytes(body), kind)
