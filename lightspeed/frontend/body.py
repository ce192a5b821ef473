"""A request body as bytes, with its Content-Encoding undone under the same size limit.

aiohttp's own decompression is turned off for the frontend (`routes`): it bounds only the bytes
it is handed, and a broken stream surfaces again while aiohttp drains the rest of the body,
where it is logged as an unhandled exception. Decoding here bounds the *decompressed* size by
the body limit (a gzip bomb is a 413 after at most `limit` bytes of output), turns a corrupt
stream into a 400, and leaves aiohttp only raw bytes to count and drain.
"""

from __future__ import annotations

import zlib

from aiohttp import web

from lightspeed.errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType

# zlib window bits per encoding: gzip's header, or zlib's for deflate (RFC 9110). Some clients
# send raw deflate without the zlib header; `_window_bits` tells them apart as aiohttp does.
_GZIP_BITS = 16 + zlib.MAX_WBITS
_ENCODINGS = {"gzip": _GZIP_BITS, "x-gzip": _GZIP_BITS, "deflate": zlib.MAX_WBITS}


async def read_body(request: web.Request, limit: int) -> bytes:
    """The decoded body; 413 past `limit` bytes (raw or decompressed), 400/415 when undecodable."""
    try:
        raw = await request.read()  # aiohttp stops at client_max_size (= limit) raw bytes
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"request body is too large: more than {limit} bytes") from None
    return decode_content(raw, request.headers.get("Content-Encoding", ""), limit)


def decode_content(raw: bytes, encoding: str, limit: int) -> bytes:
    """`raw` with `encoding` undone, at most `limit` bytes of it."""
    name = encoding.strip().lower()
    if name in ("", "identity"):
        return raw
    bits = _ENCODINGS.get(name)
    if bits is None:
        raise UnsupportedMediaType(f"unsupported Content-Encoding {encoding!r}: use gzip, deflate or identity")
    stream = zlib.decompressobj(_window_bits(bits, raw))
    try:
        out = stream.decompress(raw, limit + 1)  # one byte past the limit tells "too large"
    except zlib.error as err:
        raise InvalidRequest(f"request body is not valid {name}: {err}") from None
    if len(out) > limit:
        raise PayloadTooLarge(f"request body is too large: more than {limit} bytes once decompressed")
    if not stream.eof:
        raise InvalidRequest(f"request body is not valid {name}: the compressed stream is truncated")
    if stream.unused_data:
        raise InvalidRequest(f"request body is not valid {name}: data after the end of the compressed stream")
    return out


def _window_bits(bits: int, raw: bytes) -> int:
    """Deflate bodies without a zlib header (first byte's low nibble is not 8) are raw deflate."""
    if bits == zlib.MAX_WBITS and raw and raw[0] & 0x0F != 8:
        return -zlib.MAX_WBITS
    return bits
