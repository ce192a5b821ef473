"""Blocking socket I/O of the channel over socketpairs: exact framing, partial writes, and every
length or checksum fault detected before the bytes are trusted."""

from __future__ import annotations

import os
import random
import socket
import threading
import time

import pytest
import xxhash

from lightspeed.disagg.transfer_stream import (
    IOV_MAX,
    frames,
    recv_control,
    recv_exact,
    recv_frames,
    send_frames,
    sendmsg_all,
    set_io_timeout,
)
from lightspeed.disagg.transfer_wire import ProtocolError, PullAck, TransferCorrupt, encode_control


def _views(*sizes: int) -> list[memoryview]:
    data = os.urandom(sum(sizes))
    out, pos = [], 0
    for size in sizes:
        out.append(memoryview(data)[pos : pos + size])
        pos += size
    return out


def test_frames_cut_views_into_exact_sizes() -> None:
    views = _views(5, 12, 3, 10)
    got = list(frames([views[0], memoryview(b""), *views[1:]], 8))
    assert [size for _, size in got] == [8, 8, 8, 6]
    assert [[len(v) for v in f] for f, _ in got] == [[5, 3], [8], [1, 3, 4], [6]]
    assert b"".join(bytes(v) for f, _ in got for v in f) == b"".join(bytes(v) for v in views)
    assert [size for _, size in frames(_views(4, 4), 8)] == [8]  # exactly full: one frame


@pytest.mark.parametrize("seed", range(20))
def test_frames_keep_every_byte_in_order_for_any_cut(seed: int) -> None:
    rng = random.Random(seed)
    views = _views(*[rng.choice([0, 1, 2, 7, 64, 100]) for _ in range(rng.randint(0, 40))])
    frame_bytes = rng.choice([1, 3, 50, 64, 1000])
    got = list(frames(views, frame_bytes))
    total = sum(len(v) for v in views)
    assert [size for _, size in got] == [min(frame_bytes, total - i) for i in range(0, total, frame_bytes)]
    assert all(sum(len(v) for v in f) == size and all(len(v) for v in f) for f, size in got)
    assert b"".join(bytes(v) for f, _ in got for v in f) == b"".join(bytes(v) for v in views)


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    for s in (a, b):
        s.settimeout(10.0)
    return a, b


def _send_in_thread(target: object, *args: object) -> threading.Thread:
    thread = threading.Thread(target=target, args=args)  # type: ignore[arg-type]
    thread.start()
    return thread


def test_sendmsg_all_writes_more_buffers_than_iov_max_across_partial_writes() -> None:
    a, b = _pair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # forces partial sendmsg calls
    views = _views(*([37] * (IOV_MAX + 500)), 100_000)
    expected = b"".join(bytes(v) for v in views)
    thread = _send_in_thread(sendmsg_all, a, views, len(expected))
    got = bytearray(len(expected))
    recv_exact(b, memoryview(got))
    thread.join()
    assert bytes(got) == expected
    a.close(), b.close()


@pytest.mark.parametrize("frame_bytes", [1, 1000, 1 << 20])
def test_frames_round_trip_into_one_buffer(frame_bytes: int) -> None:
    a, b = _pair()
    views = _views(3000, 1, 7000)
    total = 10_001
    thread = _send_in_thread(send_frames, a, views, frame_bytes)
    dest = bytearray(total)
    recv_frames(b, memoryview(dest), frame_bytes)
    thread.join()
    assert bytes(dest) == b"".join(bytes(v) for v in views)
    a.close(), b.close()


def _frame(body: bytes, length: int | None = None, checksum: int | None = None) -> bytes:
    size = len(body) if length is None else length
    digest = xxhash.xxh3_64_intdigest(body) if checksum is None else checksum
    return size.to_bytes(8, "little") + body + digest.to_bytes(8, "little")


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (_frame(b"abcd", checksum=1) + _frame(b"efgh"), "checksum mismatch in the frame at offset 0"),
        (_frame(b"abcd") + _frame(b"efgh", checksum=2), "checksum mismatch in the frame at offset 4"),
        (_frame(b"abcdefghi", length=9), "data frame of 9 bytes at offset 0"),  # longer than the buffer
        (_frame(b"", length=0), "data frame of 0 bytes"),
        ((1 << 62).to_bytes(8, "little"), "data frame of 4611686018427387904 bytes"),
        (_frame(b"abcd")[:-3], "stream ended after 5 of 8 bytes"),  # a cut trailer
        (_frame(b"abcd") + b"\x04\x00", "stream ended after 2 of 8 bytes"),  # a cut prefix
    ],
)
def test_damaged_frames_are_corrupt(wire: bytes, message: str) -> None:
    a, b = _pair()
    a.sendall(wire)
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(TransferCorrupt, match=message):
        recv_frames(b, memoryview(bytearray(8)), max_frame_bytes=8)
    a.close(), b.close()


def test_frames_over_the_receivers_limit_are_corrupt() -> None:
    a, b = _pair()
    a.sendall(_frame(b"x" * 16))
    with pytest.raises(TransferCorrupt, match=r"\(limit 8\)"):
        recv_frames(b, memoryview(bytearray(32)), max_frame_bytes=8)
    a.close(), b.close()


def test_io_timeout_bounds_a_blocking_receive() -> None:
    a, b = socket.socketpair()
    set_io_timeout(b, 0.2)
    assert b.gettimeout() is None  # blocking: one system call per receive, no polling
    started = time.monotonic()
    with pytest.raises(OSError):  # EAGAIN once the kernel's timeout passes
        recv_exact(b, memoryview(bytearray(4)))
    assert 0.15 <= time.monotonic() - started < 5.0
    a.close(), b.close()


def test_control_frames_are_bounded_and_typed() -> None:
    a, b = _pair()
    a.sendall(encode_control(PullAck(ok=True)))
    assert recv_control(b, PullAck) == PullAck(ok=True)
    a.sendall(b"\x01\x00\x00\x00")  # 16 MiB announced
    with pytest.raises(ProtocolError, match="control frame of 16777216 bytes"):
        recv_control(b, PullAck)
    a.close(), b.close()
