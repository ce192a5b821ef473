"""KV transfer data channel: the messages, their limits and the errors both ends raise.

A pull is one TCP connection: the decode side sends one `PullRequest` control frame, the prefill
side answers one `PullReply`, then (TCP mode) streams the payload as data frames
`[u64 length][body][u64 xxh3_64(body)]` with no per-block round trip, or (shared-memory mode)
names a segment that already holds the payload and its checksum. The decode side ends with a
`PullAck`; only an ok ack releases the prefill side's pinned blocks.

Control frames are a 4-byte big-endian length and a msgpack body, bounded by
`MAX_CONTROL_BYTES`, so a forged length prefix is refused before its body is buffered.
The payload is laid out as `lightspeed.native.kv_transfer` exports it:
[layers, 2 (K, V), blocks, block_size, kv_heads, head_dim] in the header's dtype.
"""

from __future__ import annotations

from typing import Literal, TypeVar

import msgspec

from lightspeed.native.kv_transfer import KvBlocksHeader

PROTOCOL_VERSION = 1
CONTROL_LEN_BYTES = 4
# A request carries at most one position per block (~5 msgpack bytes each): 1 MiB holds ~200k
# positions, far more than any real transfer, so anything bigger is a forged or broken peer.
MAX_CONTROL_BYTES = 1024 * 1024
DATA_PREFIX_BYTES = 8  # u64 little-endian body length
DATA_TRAILER_BYTES = 8  # u64 little-endian xxh3_64 of the body
MAX_TRANSFER_ID_CHARS = 64

# Bytes per element for the dtypes a KV cache may hold; a header naming anything else is refused.
DTYPE_BYTES = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float64": 8,
    "int8": 1,
    "uint8": 1,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
}

TransferMode = Literal["tcp", "shm"]
ReleaseReason = Literal["pulled", "timeout", "cancelled", "shutdown"]


class KvTransferError(Exception):
    """A pull failed. `retryable` says whether another attempt may succeed."""

    retryable = False


class TransferNotFound(KvTransferError):
    """The prefill side holds no such transfer (never registered, released or timed out)."""


class LayoutMismatch(KvTransferError, ValueError):
    """The sender's KV layout differs from the receiver's cache (the `KvBlocksHeader` check)."""


class ProtocolError(KvTransferError):
    """The peer sent a frame that is malformed, oversized or inconsistent with the request."""


class TransferCorrupt(KvTransferError):
    """The payload arrived short or with a wrong checksum; nothing was imported."""

    retryable = True


class TransferUnavailable(KvTransferError):
    """The peer could not be reached, timed out, was busy or dropped the connection."""

    retryable = True


def chunk_nbytes(header: KvBlocksHeader) -> int:
    """Bytes of one block's K (or V) in one layer: the unit the cache keeps contiguous."""
    return header.block_size * header.num_kv_heads * header.head_dim * DTYPE_BYTES[header.dtype]


def block_nbytes(header: KvBlocksHeader) -> int:
    """Bytes one block occupies in the payload (K and V of every layer)."""
    return header.num_layers * 2 * chunk_nbytes(header)


def check_header(header: KvBlocksHeader, field: str = "header") -> None:
    """ValueError naming the field when a header cannot describe a real KV layout."""
    if header.dtype not in DTYPE_BYTES:
        raise ValueError(f"{field}.dtype {header.dtype!r} is not one of {sorted(DTYPE_BYTES)}")
    for name in ("num_layers", "num_blocks", "block_size", "num_kv_heads", "head_dim"):
        if getattr(header, name) <= 0:
            raise ValueError(f"{field}.{name} must be > 0, got {getattr(header, name)}")


def with_blocks(header: KvBlocksHeader, num_blocks: int) -> KvBlocksHeader:
    """The same layout describing `num_blocks` blocks (a subset of a transfer)."""
    return msgspec.structs.replace(header, num_blocks=num_blocks)


class TransferParams(msgspec.Struct, frozen=True, kw_only=True):
    """Where and what to pull: the prefill side's answer, handed to the decode side.

    `transfer_id` is an unguessable token: holding it is what allows a pull. `header` describes
    all `num_blocks` blocks of the transfer; `nbytes` is their payload size. `block_hashes`
    (optional, transfer order) lets the decode side pick the subset it does not cache.
    `host_id` identifies the prefill host for the shared-memory fast path.
    """

    host: str
    port: int
    transfer_id: str
    num_blocks: int
    nbytes: int
    header: KvBlocksHeader
    block_hashes: list[int] = []
    host_id: str = ""

    def validate(self) -> None:
        """ValueError naming the field when the params are inconsistent (e.g. forged)."""
        if not self.host:
            raise ValueError("kv_transfer_params.host is empty")
        if not 0 < self.port < 65536:
            raise ValueError(f"kv_transfer_params.port {self.port} is out of 1..65535")
        if not 0 < len(self.transfer_id) <= MAX_TRANSFER_ID_CHARS:
            raise ValueError(f"kv_transfer_params.transfer_id must have 1..{MAX_TRANSFER_ID_CHARS} characters")
        check_header(self.header, "kv_transfer_params.header")
        if self.num_blocks != self.header.num_blocks:
            raise ValueError(f"kv_transfer_params.num_blocks {self.num_blocks} != header.num_blocks")
        if self.nbytes != self.num_blocks * block_nbytes(self.header):
            raise ValueError(f"kv_transfer_params.nbytes {self.nbytes} does not match the header's layout")
        if self.block_hashes and len(self.block_hashes) != self.num_blocks:
            raise ValueError("kv_transfer_params.block_hashes must have one hash per block")

    def to_builtins(self) -> dict[str, object]:
        """Plain dict, for `kv_transfer_params` fields of the request-plane messages."""
        out = msgspec.to_builtins(self)
        assert isinstance(out, dict)
        return out

    @classmethod
    def from_builtins(cls, data: object) -> TransferParams:
        """Parse and validate a `kv_transfer_params` dict; ValueError naming the field if bad."""
        try:
            params = msgspec.convert(data, cls)
        except msgspec.ValidationError as exc:
            raise ValueError(f"kv_transfer_params: {exc}") from exc
        params.validate()
        return params


class TransferRelease(msgspec.Struct, frozen=True):
    """Told to the owner once per registered transfer, when its blocks may be freed."""

    transfer_id: str
    reason: ReleaseReason
    num_blocks: int


class PullResult(msgspec.Struct, frozen=True):
    """What one successful pull moved."""

    transfer_id: str
    mode: TransferMode
    num_blocks: int
    nbytes: int
    attempts: int
    seconds: float


class PullRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    version: int
    transfer_id: str
    positions: list[int] | None  # indices into the transfer's blocks; None = all, in order
    host_id: str  # the puller's host identity; "" = TCP only


class PullReply(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    ok: bool
    code: str = ""  # on error: "not_found", "busy", "bad_request"
    message: str = ""
    header: KvBlocksHeader | None = None  # layout of exactly the requested blocks
    nbytes: int = 0
    frame_bytes: int = 0  # TCP: largest data frame the server will send
    shm_name: str = ""  # shared-memory mode: the segment holding the payload
    shm_checksum: int = 0  # xxh3_64 of the whole payload in the segment


class PullAck(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    ok: bool  # the bytes verified: the server releases the transfer


_encoder = msgspec.msgpack.Encoder()
_M = TypeVar("_M", PullRequest, PullReply, PullAck)


def encode_control(msg: PullRequest | PullReply | PullAck) -> bytes:
    body = _encoder.encode(msg)
    return len(body).to_bytes(CONTROL_LEN_BYTES, "big") + body


def control_length(prefix: bytes) -> int:
    """The body length a control prefix announces; ProtocolError when oversized."""
    size = int.from_bytes(prefix, "big")
    if size == 0 or size > MAX_CONTROL_BYTES:
        raise ProtocolError(f"control frame of {size} bytes is outside 1..{MAX_CONTROL_BYTES}")
    return size


def decode_control(body: bytes, kind: type[_M]) -> _M:
    try:
        return msgspec.msgpack.decode(body, type=kind)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"undecodable {kind.__name__}: {exc}") from exc
