"""Transfer messages: params validation naming the field, sizes from the layout, bounded frames."""

from __future__ import annotations

import msgspec
import pytest

from lightspeed.disagg.transfer_wire import (
    MAX_CONTROL_BYTES,
    ProtocolError,
    PullAck,
    PullReply,
    PullRequest,
    TransferCorrupt,
    TransferNotFound,
    TransferParams,
    TransferUnavailable,
    block_nbytes,
    check_header,
    chunk_nbytes,
    control_length,
    decode_control,
    encode_control,
    with_blocks,
)
from lightspeed.native.kv_transfer import KvBlocksHeader

# SmolLM2-135M: 30 layers, 3 KV heads, head dim 64; block size 16, fp32.
SMOLLM2 = KvBlocksHeader(num_layers=30, num_blocks=4, block_size=16, num_kv_heads=3, head_dim=64, dtype="float32")


def _params(**changes: object) -> TransferParams:
    base = TransferParams(
        host="127.0.0.1", port=5000, transfer_id="t1", num_blocks=4, nbytes=4 * 737280, header=SMOLLM2
    )
    return msgspec.structs.replace(base, **changes)


def test_sizes_follow_the_layout() -> None:
    assert chunk_nbytes(SMOLLM2) == 16 * 3 * 64 * 4 == 12288
    assert block_nbytes(SMOLLM2) == 30 * 2 * 12288 == 737280
    bf16 = msgspec.structs.replace(SMOLLM2, dtype="bfloat16", block_size=64)
    assert block_nbytes(bf16) == 30 * 2 * 64 * 3 * 64 * 2
    assert with_blocks(SMOLLM2, 1) == msgspec.structs.replace(SMOLLM2, num_blocks=1)


def test_params_round_trip_through_builtins() -> None:
    params = _params(block_hashes=[1, 2, 3, 2**63], host_id="h")
    data = params.to_builtins()
    assert data["header"] == msgspec.to_builtins(SMOLLM2)
    assert TransferParams.from_builtins(msgspec.json.decode(msgspec.json.encode(data))) == params


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"host": ""}, "host is empty"),
        ({"port": 0}, "port 0"),
        ({"transfer_id": ""}, "transfer_id"),
        ({"transfer_id": "x" * 65}, "transfer_id"),
        ({"num_blocks": 5}, "num_blocks 5"),
        ({"nbytes": 1}, "nbytes 1"),
        ({"block_hashes": [1]}, "block_hashes"),
        ({"header": msgspec.structs.replace(SMOLLM2, dtype="complex64")}, "header.dtype 'complex64'"),
        ({"header": msgspec.structs.replace(SMOLLM2, head_dim=0)}, "header.head_dim must be > 0"),
    ],
)
def test_inconsistent_params_are_refused_naming_the_field(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _params(**changes).validate()


def test_params_of_the_wrong_shape_are_a_value_error() -> None:
    with pytest.raises(ValueError, match="kv_transfer_params: Expected `int`"):
        TransferParams.from_builtins({**_params().to_builtins(), "port": "80"})
    with pytest.raises(ValueError, match="missing required field `header`"):
        TransferParams.from_builtins({k: v for k, v in _params().to_builtins().items() if k != "header"})


def test_check_header_accepts_real_layouts() -> None:
    check_header(SMOLLM2)
    with pytest.raises(ValueError, match=r"h\.num_layers must be > 0, got -1"):
        check_header(msgspec.structs.replace(SMOLLM2, num_layers=-1), "h")


def test_control_frames_round_trip_and_are_bounded() -> None:
    for msg in (PullRequest(1, "t", [3, 1], ""), PullReply(ok=True, header=SMOLLM2, nbytes=9), PullAck(ok=True)):
        frame = encode_control(msg)
        assert control_length(frame[:4]) == len(frame) - 4
        assert decode_control(frame[4:], type(msg)) == msg
    assert control_length(MAX_CONTROL_BYTES.to_bytes(4, "big")) == MAX_CONTROL_BYTES
    with pytest.raises(ProtocolError, match=r"outside 1\.\."):
        control_length((MAX_CONTROL_BYTES + 1).to_bytes(4, "big"))
    with pytest.raises(ProtocolError, match=r"outside 1\.\."):
        control_length(b"\x00\x00\x00\x00")
    with pytest.raises(ProtocolError, match="undecodable PullRequest"):
        decode_control(encode_control(PullAck(ok=True))[4:], PullRequest)


def test_which_errors_are_retryable() -> None:
    assert TransferCorrupt.retryable and TransferUnavailable.retryable
    assert not TransferNotFound.retryable and not ProtocolError.retryable
