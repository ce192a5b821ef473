"""Frontend flow helpers: the decode leg's request, and which pool a pinned worker pins."""

from __future__ import annotations

from lightspeed.disagg.flow import DisaggFlow, decode_request
from lightspeed.protocol import KvTransferParams, PreprocessedRequest, StopConditions, WorkerCard, WorkerRole


def test_decode_request_is_prompt_plus_first_token_with_reduced_limits() -> None:
    params = KvTransferParams(transfer_id="t", num_tokens=3)
    req = PreprocessedRequest("r", "m", [1, 2, 3], stop=StopConditions(max_tokens=10, min_tokens=4))
    leg = decode_request(req, [9], params)
    assert leg.token_ids == [1, 2, 3, 9] and leg.kv_transfer_params == params
    assert (leg.stop.max_tokens, leg.stop.min_tokens) == (9, 3)
    unbounded = decode_request(PreprocessedRequest("r", "m", [1]), [9], params)
    assert (unbounded.stop.max_tokens, unbounded.stop.min_tokens) == (None, 0)


def test_split_pin() -> None:
    cards = {
        "p": WorkerCard("p", "m", "a:1", role=WorkerRole.PREFILL),
        "d": WorkerCard("d", "m", "a:2", role=WorkerRole.DECODE),
    }
    assert DisaggFlow.split_pin(cards, "p") == (None, "p")
    assert DisaggFlow.split_pin(cards, "d") == ("d", None)
    assert DisaggFlow.split_pin(cards, None) == (None, None)
    assert DisaggFlow.split_pin(cards, "unknown") == ("unknown", None)  # the router's 400 names it
