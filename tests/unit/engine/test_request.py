"""Request admission checks the engine makes itself (defence in depth behind the frontend)."""

from __future__ import annotations

import pytest

from lightspeed.engine.request import Request
from lightspeed.protocol import MAX_STOP_TOKEN_IDS, PreprocessedRequest, StopConditions


def pre(tokens: list[int], stop: StopConditions | None = None) -> PreprocessedRequest:
    return PreprocessedRequest(request_id="r", model="m", token_ids=tokens, stop=stop or StopConditions())


def test_token_ids_checked_against_the_vocabulary() -> None:
    Request(pre([0, 99]), block_size=4, max_model_len=64, vocab_size=100)
    with pytest.raises(ValueError, match=r"request r: prompt holds a token id outside \[0, 100\)"):
        Request(pre([5, 10**12]), block_size=4, max_model_len=64, vocab_size=100)
    with pytest.raises(ValueError, match="prompt holds a token id outside"):
        Request(pre([-1, 5]), block_size=4, max_model_len=64, vocab_size=100)
    with pytest.raises(ValueError, match="stop_token_ids holds a token id outside"):
        Request(pre([5], StopConditions(stop_token_ids=[100])), block_size=4, max_model_len=64, vocab_size=100)


def test_unchecked_without_a_vocabulary() -> None:
    assert Request(pre([10**6]), block_size=4, max_model_len=64).token_ids == [10**6]


def test_stop_token_id_list_is_bounded() -> None:
    ok = StopConditions(stop_token_ids=list(range(MAX_STOP_TOKEN_IDS)), min_tokens=1)
    Request(pre([1]), block_size=4, max_model_len=64, vocab_size=1000)
    Request(pre([1], ok), block_size=4, max_model_len=64, vocab_size=1000)
    too_many = StopConditions(stop_token_ids=list(range(MAX_STOP_TOKEN_IDS + 1)), min_tokens=1)
    with pytest.raises(ValueError, match=f"more than {MAX_STOP_TOKEN_IDS} stop_token_ids"):
        Request(pre([1], too_many), block_size=4, max_model_len=64, vocab_size=1000)
