"""The request types: what decoding accepts and the derived values (checks: test_validation.py)."""

from __future__ import annotations

import re

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


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({"tools": []}, "`tools`"),
        ({"messages": [{"role": "user", "content": "x", "audio": None}]}, "`audio` - at `$.messages[0]`"),
        ({"stream_options": {"include_usage": True, "x": 1}}, "`x` - at `$.stream_options`"),
        ({"nvext": {"other": 1}}, "`other` - at `$.nvext`"),
    ],
)
def test_unknown_fields_are_refused_at_every_level(body: dict[str, object], where: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=f"^Object contains unknown field {re.escape(where)}$"):
        chat(**body)


def test_completion_refuses_unknown_fields_too() -> None:
    with pytest.raises(msgspec.ValidationError, match=r"^Object contains unknown field `suffix`$"):
        completion(prompt="x", suffix="y")


def test_caller_tags() -> None:
    req = completion(prompt="x", user="u", metadata={"k": "v"})
    assert (req.user, req.metadata, req.store) == ("u", {"k": "v"}, False)
    assert completion(prompt="x", logprobs=3).num_logprobs == 3
