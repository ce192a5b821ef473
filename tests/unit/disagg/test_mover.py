"""The mocker's modelled transfer: bytes per token from the model's shape, time = bytes / bandwidth."""

from __future__ import annotations

import asyncio

import pytest

from lightspeed.config import KvTransferOptions
from lightspeed.disagg.mover import ModelledMover, TransferGone, kv_bytes_per_token, pulled_tokens, transfer_seconds
from lightspeed.protocol import KvTransferParams


def test_bytes_per_token_of_an_8b_llama_in_bf16() -> None:
    assert kv_bytes_per_token(32, 8, 128, 2) == 131072  # 2 (K, V) x 32 x 8 x 128 x 2 bytes
    assert KvTransferOptions().mocker_bytes_per_token == 131072
    with pytest.raises(ValueError, match="head_dim"):
        kv_bytes_per_token(32, 8, 0, 2)


def test_transfer_seconds() -> None:
    assert transfer_seconds(1000, 131072, 25e9) == pytest.approx(131072000 / 25e9)
    assert transfer_seconds(1000, 131072, 25e9, speedup_ratio=4.0) == pytest.approx(131072000 / 25e9 / 4)
    with pytest.raises(ValueError, match="kv_transfer_bandwidth"):
        transfer_seconds(1, 1, 0)


def test_pulled_tokens_counts_the_partial_last_block() -> None:
    params = KvTransferParams(num_tokens=100, block_size=16, block_ids=list(range(7)))
    assert pulled_tokens(params, range(7)) == 100
    assert pulled_tokens(params, range(2, 7)) == 100 - 32
    assert pulled_tokens(params, [6]) == 4


async def test_pull_sleeps_the_modelled_time_then_releases() -> None:
    released: list[str] = []

    async def release(params: KvTransferParams) -> bool:
        released.append(params.transfer_id)
        return True

    mover = ModelledMover(kv_bytes_per_token=1000, bandwidth=1e6, release=release)  # 1 ms per token
    params = KvTransferParams(transfer_id="t", num_tokens=50, block_size=16, kv_bytes_per_token=1000)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await mover.pull(params, range(4), [0, 1, 2, 3])
    assert loop.time() - started >= 0.045
    assert released == ["t"] and mover.num_pulls == 1 and mover.modelled_seconds == pytest.approx(0.05)


async def test_pull_fails_when_the_prefill_side_no_longer_holds_it() -> None:
    async def gone(params: KvTransferParams) -> bool:
        return False

    mover = ModelledMover(kv_bytes_per_token=1, bandwidth=1e9, release=gone)
    with pytest.raises(TransferGone):
        await mover.pull(KvTransferParams(transfer_id="t", num_tokens=8, block_size=16), [0], [5])
    assert mover.num_pulls == 0
