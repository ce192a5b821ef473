"""Request-plane wire format: length-prefixed msgpack frames.

A frame is a 4-byte big-endian body length followed by a msgpack body. The body is one of the
tagged Structs below (tag field "t"); streams are multiplexed over one connection by `id`.
Encoding writes the prefix and body into one buffer (no concatenation copy), and decoding
parses straight out of the bytes handed to `data_received` when no partial frame is pending,
because the per-frame cost here bounds the token rate one connection can carry.
"""

from __future__ import annotations

import msgspec

HEADER_BYTES = 4
# The largest frame a request-plane peer may send. Sized to real frames, not to a guess: the
# largest is a Request carrying a prompt, ~5 msgpack bytes per token id, so 16 MiB holds a
# 3M-token prompt with room for sampling options. KV block contents never travel here (they
# have their own data channel), so nothing legitimate comes near it, and a hostile length
# prefix is refused before a byte of its body is buffered.
MAX_FRAME_BYTES = 16 * 1024 * 1024


class Request(msgspec.Struct, frozen=True, tag_field="t", tag="request"):
    id: int
    endpoint: str
    payload: bytes


class Cancel(msgspec.Struct, frozen=True, tag_field="t", tag="cancel"):
    id: int


class Data(msgspec.Struct, frozen=True, tag_field="t", tag="data"):
    id: int
    payload: bytes


class End(msgspec.Struct, frozen=True, tag_field="t", tag="end"):
    id: int


class Error(msgspec.Struct, frozen=True, tag_field="t", tag="error"):
    id: int
    code: str
    message: str


class Challenge(msgspec.Struct, frozen=True, tag_field="t", tag="challenge"):
    """Server -> caller, first frame of a connection when the cluster secret is on."""

    nonce: bytes


class Auth(msgspec.Struct, frozen=True, tag_field="t", tag="auth"):
    """Caller -> server: proof of the cluster secret over both nonces, and the caller's nonce."""

    proof: bytes
    nonce: bytes


class AuthOk(msgspec.Struct, frozen=True, tag_field="t", tag="auth_ok"):
    """Server -> caller: the server's own proof, so a caller never talks to an impostor."""

    proof: bytes


Frame = Request | Cancel | Data | End | Error | Challenge | Auth | AuthOk
# Before the handshake completes a peer may send only this much per frame (an Auth is ~80
# bytes): an unauthenticated peer cannot make the server buffer a large frame.
HANDSHAKE_FRAME_BYTES = 256


class FrameError(Exception):
    """The peer sent bytes that are not a valid frame; the connection must be dropped."""


_encoder = msgspec.msgpack.Encoder()


def encode_frame(frame: Frame) -> bytearray:
    """Prefix + body in a single buffer, ready for `transport.write`."""
    buf = bytearray(HEADER_BYTES)
    _encoder.encode_into(frame, buf, HEADER_BYTES)
    buf[:HEADER_BYTES] = (len(buf) - HEADER_BYTES).to_bytes(HEADER_BYTES, "big")
    return buf


class FrameDecoder:
    """Incremental decoder: feed raw bytes, get the complete frames they finish."""

    __slots__ = ("_buf", "_decoder", "_max_frame")

    def __init__(self, max_frame: int = MAX_FRAME_BYTES) -> None:
        self._buf = bytearray()
        self._decoder = msgspec.msgpack.Decoder(Frame)
        self._max_frame = max_frame

    @property
    def pending_bytes(self) -> int:
        return len(self._buf)

    def set_max_frame(self, max_frame: int) -> None:
        """Change the frame size limit (raised once a peer has authenticated)."""
        self._max_frame = max_frame

    def feed(self, data: bytes) -> list[Frame]:
        """Decode every complete frame; keep the trailing partial frame for the next call."""
        if self._buf:
            self._buf += data
            frames, used = self._parse(self._buf)
            del self._buf[:used]
        else:
            # Common case: no partial frame pending, so parse the received bytes in place.
            frames, used = self._parse(data)
            if used < len(data):
                self._buf += memoryview(data)[used:]
        return frames

    def _parse(self, data: bytes | bytearray) -> tuple[list[Frame], int]:
        frames: list[Frame] = []
        pos = 0
        end = len(data)
        with memoryview(data) as view:
            while end - pos >= HEADER_BYTES:
                size = int.from_bytes(view[pos : pos + HEADER_BYTES], "big")
                if size > self._max_frame:
                    raise FrameError(f"frame of {size} bytes exceeds limit {self._max_frame}")
                body_end = pos + HEADER_BYTES + size
                if body_end > end:
                    break
                try:
                    frames.append(self._decoder.decode(view[pos + HEADER_BYTES : body_end]))
                except msgspec.DecodeError as exc:
                    raise FrameError(f"undecodable frame: {exc}") from exc
                pos = body_end
        return frames, pos
