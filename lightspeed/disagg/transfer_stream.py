"""Blocking socket I/O of the data channel, run on worker threads (never on the event loop).

The sender cuts the payload views into frames of at most `frame_bytes` and writes each with
`sendmsg` (scatter-gather straight from the cache: no staging copy), hashing a frame's views
after they were sent, while they are still in cache, for its trailer. The receiver `recv_into`s
each frame at its place in one preallocated buffer and checks length and checksum as it lands.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
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


def frames(views: Iterator[memoryview], frame_bytes: int) -> Iterator[list[memoryview]]:
    """Group (and split) views into frames of exactly `frame_bytes`, the last one shorter."""
    frame: list[memoryview] = []
    size = 0
    for view in views:
        while len(view):
            take = min(len(view), frame_bytes - size)
            frame.append(view[:take])
            size += take
            view = view[take:]
            if size == frame_bytes:
                yield frame
                frame, size = [], 0
    if frame:
        yield frame


def sendmsg_all(sock: socket.socket, buffers: list[Buffer]) -> None:
    """Write every buffer in order; resumes after partial writes (a socket with a timeout)."""
    pending = [memoryview(b) for b in buffers if len(b)]
    first = 0
    while first < len(pending):
        sent = sock.sendmsg(pending[first : first + IOV_MAX])
        while sent:
            size = len(pending[first])
            if sent >= size:
                sent -= size
                first += 1
            else:
                pending[first] = pending[first][sent:]
                sent = 0


def send_frames(sock: socket.socket, views: Iterator[memoryview], frame_bytes: int) -> int:
    """Stream `views` as data frames `[u64 length][body][u64 xxh3_64]`; returns the bytes sent."""
    trailer = b""
    total = 0
    for frame in frames(views, frame_bytes):
        size = sum(len(v) for v in frame)
        sendmsg_all(sock, [trailer + size.to_bytes(DATA_PREFIX_BYTES, "little"), *frame])
        hasher = xxhash.xxh3_64()
        for view in frame:
            hasher.update(view)
        trailer = hasher.intdigest().to_bytes(DATA_TRAILER_BYTES, "little")
        total += size
    sock.sendall(trailer)
    return total


def recv_exact(sock: socket.socket, view: memoryview) -> None:
    """Fill `view` from the socket; TransferCorrupt if the peer ends the stream first."""
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise TransferCorrupt(f"stream ended after {got} of {len(view)} bytes")
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
        body = dest[offset : offset + size]
        recv_exact(sock, body)
        recv_exact(sock, memoryview(word))
        if xxhash.xxh3_64_intdigest(body) != int.from_bytes(word, "little"):
            raise TransferCorrupt(f"checksum mismatch in the frame at offset {offset}")
        offset += size


def recv_control(sock: socket.socket, kind: type[_M]) -> _M:
    """One length-prefixed control frame, bounded before its body is read."""
    prefix = bytearray(CONTROL_LEN_BYTES)
    recv_exact(sock, memoryview(prefix))
    body = bytearray(control_length(bytes(prefix)))
    recv_exact(sock, memoryview(body))
    return decode_control(bytes(body), kind)
