"""Disaggregation on the native engine (the real SmolLM2): KV bytes move over the transfer
channel, and greedy output is token for token the aggregated output."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from lightspeed.config import DisaggOptions
from lightspeed.disagg.flow import DisaggFlow
from lightspeed.engine.core import EngineCore
from lightspeed.protocol import LLMEngineOutput, PreprocessedRequest, SamplingOptions, StopConditions
from tests.integration.test_disagg import Fleet, prompt, start_fleet, stop_fleet

pytestmark = [pytest.mark.native, pytest.mark.asyncio(loop_scope="module")]

# 64-token steps: every prompt below is prefilled in several chunks on either side.
NATIVE = {
    "num_gpu_blocks": 512,
    "max_num_batched_tokens": 64,
    "max_model_len": 2048,
    "dtype": "float32",
}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def native_fleet() -> AsyncIterator[Fleet]:
    fleet = await start_fleet(["prefill", "decode"], engine="native", disagg=DisaggOptions(conditional=False), **NATIVE)
    yield fleet
    await stop_fleet(fleet)


async def aggregated(core: EngineCore, model: str, ids: list[int], max_tokens: int) -> list[int]:
    """The same request run whole on one engine (greedy), for reference."""
    req = PreprocessedRequest(
        f"ref-{uuid.uuid4().hex}",
        model,
        ids,
        SamplingOptions(temperature=0.0),
        StopConditions(max_tokens=max_tokens, ignore_eos=True),
    )
    out: list[int] = []
    async for o in core.add_request(req):
        out += o.new_token_ids
    return out


@pytest.mark.slow
@pytest.mark.parametrize("length", [40, 150, 333])
async def test_disaggregated_greedy_output_equals_aggregated(native_fleet: Fleet, length: int) -> None:
    (prefill,), (decode,) = native_fleet.role("prefill"), native_fleet.role("decode")
    ids = prompt(1000 + length, length)
    pulled_before = decode.disagg.decode.num_pulled if decode.disagg else 0
    got = await native_fleet.complete(ids, max_tokens=12)
    assert decode.disagg is not None and decode.disagg.decode.num_pulled == pulled_before + 1
    assert decode.disagg.decode.num_local_fallbacks == 0
    assert got == await aggregated(prefill.core, native_fleet.model, ids, 12)
    await native_fleet.idle()


@pytest.mark.slow
async def test_cached_prefix_on_the_decode_side_pulls_only_the_rest(native_fleet: Fleet) -> None:
    (prefill,), (decode,) = native_fleet.role("prefill"), native_fleet.role("decode")
    base = prompt(7, 160)  # 10 full blocks
    await native_fleet.complete(base, max_tokens=2)
    assert decode.disagg is not None
    reused = decode.disagg.decode.num_reused_tokens
    ids = base + prompt(8, 90)
    got = await native_fleet.complete(ids, max_tokens=10)
    assert decode.disagg.decode.num_reused_tokens - reused == 160  # only 90 tokens' blocks moved
    assert got == await aggregated(prefill.core, native_fleet.model, ids, 10)
    await native_fleet.idle()


@pytest.mark.slow
async def test_prefill_worker_gone_before_the_pull_still_completes_identically(
    native_fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    (prefill,), (decode,) = native_fleet.role("prefill"), native_fleet.role("decode")
    assert prefill.disagg is not None and decode.disagg is not None
    original = DisaggFlow._prefill

    async def prefill_then_vanish(self: DisaggFlow, *args: object, **kw: object) -> LLMEngineOutput | None:
        out = await original(self, *args, **kw)  # type: ignore[arg-type]
        assert out is not None and out.kv_transfer_params is not None
        prefill.disagg.prefill.release(out.kv_transfer_params.transfer_id)  # as if it had restarted
        return out

    monkeypatch.setattr(DisaggFlow, "_prefill", prefill_then_vanish)
    fallbacks = decode.disagg.decode.num_local_fallbacks
    ids = prompt(11, 120)
    got = await native_fleet.complete(ids, max_tokens=8)
    assert decode.disagg.decode.num_local_fallbacks == fallbacks + 1
    assert got == await aggregated(prefill.core, native_fleet.model, ids, 8)
    await native_fleet.idle()
