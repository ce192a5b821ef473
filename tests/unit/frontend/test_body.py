"""Content-Encoding of request bodies: decoded under the body limit, refused when broken."""

from __future__ import annotations

import gzip
import zlib

import pytest

from lightspeed.errors import InvalidRequest, LightspeedError, PayloadTooLarge, UnsupportedMediaType
from lightspeed.frontend.body import decode_content

BODY = b'{"model": "m", "prompt": "hello"}'


@pytest.mark.parametrize(
    ("encoding", "raw"),
    [
        ("", BODY),
        ("identity", BODY),
        ("gzip", gzip.compress(BODY)),
        ("GZip ", gzip.compress(BODY)),
        ("x-gzip", gzip.compress(BODY)),
        ("deflate", zlib.compress(BODY)),
        ("deflate", zlib.compress(BODY)[2:-4]),  # raw deflate, as some clients send it
    ],
)
def test_decoded(encoding: str, raw: bytes) -> None:
    assert decode_content(raw, encoding, 1024) == BODY


def refusal(raw: bytes, encoding: str, limit: int = 1024) -> LightspeedError:
    with pytest.raises(LightspeedError) as info:
        decode_content(raw, encoding, limit)
    return info.value


def test_gzip_bomb_stops_at_the_limit() -> None:
    """Decompressed size is bounded by the body limit, whatever the compressed size."""
    bomb = gzip.compress(b"[" + b" " * 5_000_000 + b"]")
    err = refusal(bomb, "gzip", 256 * 1024)
    assert isinstance(err, PayloadTooLarge) and err.status == 413
    assert err.message == f"request body is too large: more than {256 * 1024} bytes once decompressed"
    assert decode_content(gzip.compress(b"x" * 1024), "gzip", 1024) == b"x" * 1024  # exactly the limit


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"garbage", "request body is not valid gzip: Error -3 while decompressing data: incorrect header check"),
        (gzip.compress(BODY)[:-9], "request body is not valid gzip: the compressed stream is truncated"),
        (b"", "request body is not valid gzip: the compressed stream is truncated"),
        (gzip.compress(BODY) + b"xx", "request body is not valid gzip: data after the end of the compressed stream"),
    ],
)
def test_broken_gzip_is_400(raw: bytes, message: str) -> None:
    err = refusal(raw, "gzip")
    assert isinstance(err, InvalidRequest) and (err.status, err.message) == (400, message)


def test_unknown_encoding_is_415() -> None:
    err = refusal(BODY, "br")
    assert isinstance(err, UnsupportedMediaType) and err.status == 415
    assert err.message == "unsupported Content-Encoding 'br': use gzip, deflate or identity"
