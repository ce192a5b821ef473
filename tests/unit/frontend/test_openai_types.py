"""The request types: what decoding accepts and the derived values (checks: test_validation.py)."""

from __future__ import annotations

import msgspec
import pytest

from lightspeed.frontend.openai_types import ChatCompletionRequest, ChatMessage, CompletionRequest


def chat(**kw: object) -> ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **kw}
    return msgspec.json.decode(msgspec.json.encode(body), type=ChatCompletionRequest)


def completion(**kw: object) -> CompletionRequest:
    return msgspec.json.decode(msgspec.json.encode({"model": "m", **kw}), type=CompletionRequest)


def test_defaults_and_stop_forms() -> None:
    req = chat(stop="END")
    assert req.stop_list == ["END"] and req.output_limit is None and not req.include_usage
    assert chat().stop_list == []
    assert chat(stop=["a", "b"], stream_options={"include_usage": True}).include_usage


def test_max_completion_tokens_wins() -> None:
    assert chat(max_tokens=5, max_completion_tokens=9).output_limit == 9
    assert chat(max_tokens=5).output_limit == 5


def test_num_logprobs() -> None:
    assert chat().num_logprobs is None
    assert chat(logprobs=True).num_logprobs == 0
    assert chat(logprobs=True, top_logprobs=3).num_logprobs == 3


def test_wrong_type_is_a_validation_error() -> None:
    with pytest.raises(msgspec.ValidationError, match=r"\$.max_tokens"):
        chat(max_tokens="ten")


def test_role_is_a_closed_set() -> None:
    with pytest.raises(msgspec.ValidationError, match=r"Invalid enum value 'wizard' - at `\$.messages\[0\].role`"):
        chat(messages=[{"role": "wizard", "content": "x"}])


def test_template_dict_drops_unset_fields() -> None:
    message = ChatMessage(role="tool", content="42", tool_call_id="c1")
    assert message.to_template_dict() == {"role": "tool", "content": "42", "tool_call_id": "c1"}


def test_completion_prompt_forms() -> None:
    assert completion(prompt="hi").prompt_value() == "hi"
    assert completion(prompt=[1, 2]).prompt_value() == [1, 2]
    assert completion(prompt=[[3, 4]]).prompt_value() == [3, 4]
    assert completion(prompt=["x"]).prompt_value() == "x"
    assert completion(prompt=["a", "b"]).single_prompt() == ["a", "b"]  # a batch stays a batch (refused)
    assert completion(prompt="hi").output_limit == 16
