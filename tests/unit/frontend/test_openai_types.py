from __future__ import annotations

import msgspec
import pytest

from lightspeed.errors import InvalidRequest
from lightspeed.frontend.openai_types import ChatCompletionRequest, CompletionRequest


def chat(**kw: object) -> ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **kw}
    return msgspec.json.decode(msgspec.json.encode(body), type=ChatCompletionRequest)


def completion(**kw: object) -> CompletionRequest:
    return msgspec.json.decode(msgspec.json.encode({"model": "m", **kw}), type=CompletionRequest)


def test_defaults_and_stop_forms() -> None:
    req = chat(stop="END")
    req.validate()
    assert req.stop_list == ["END"] and req.output_limit is None and not req.include_usage
    assert chat(stop=["a", "b"], stream_options={"include_usage": True}).include_usage


def test_max_completion_tokens_wins() -> None:
    assert chat(max_tokens=5, max_completion_tokens=9).output_limit == 9


@pytest.mark.parametrize(
    "kw,param",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"n": 3}, "n"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
        ({"stop": [""]}, "stop"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"messages": []}, "messages"),
    ],
)
def test_chat_validation(kw: dict, param: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        chat(**kw).validate()
    assert err.value.param == param


def test_wrong_type_is_a_validation_error() -> None:
    with pytest.raises(msgspec.ValidationError, match=r"\$.max_tokens"):
        chat(max_tokens="ten")


def test_completion_prompt_forms() -> None:
    assert completion(prompt="hi").prompt_value() == "hi"
    assert completion(prompt=[1, 2]).prompt_value() == [1, 2]
    assert completion(prompt=[[3, 4]]).prompt_value() == [3, 4]
    assert completion(prompt=["x"]).prompt_value() == "x"
    assert completion(prompt="hi").output_limit == 16
    for bad in ([], ["a", "b"], [1, "a"], [-1], [[1], [2]]):
        with pytest.raises(InvalidRequest):
            completion(prompt=bad).validate()
