"""Every request check, with its exact message and the field it names."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from lightspeed.errors import InvalidRequest
from lightspeed.frontend.openai_types import AnyRequest, ChatCompletionRequest, CompletionRequest
from lightspeed.frontend.validation import (
    TEMPERATURE_HEADER,
    WEIGHT_HEADER,
    check_prompt,
    decode_request,
    router_overrides,
    validate_request,
)
from lightspeed.router.selector import RouterOverrides

CHAT = msgspec.json.Decoder(ChatCompletionRequest)
COMPLETION = msgspec.json.Decoder(CompletionRequest)
HELLO = [{"role": "user", "content": "hi"}]


def chat(**kw: Any) -> ChatCompletionRequest:
    return decode_request(CHAT, msgspec.json.encode({"model": "m", "messages": HELLO, **kw}))


def completion(**kw: Any) -> CompletionRequest:
    return decode_request(COMPLETION, msgspec.json.encode({"model": "m", "prompt": "hi", **kw}))


def refused(req: AnyRequest) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        validate_request(req)
    assert info.value.status == 400
    return info.value


# ---------------------------------------------------------------- decoding


def decode_error(body: bytes) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        decode_request(CHAT, body)
    assert info.value.status == 400
    return info.value


@pytest.mark.parametrize(
    ("body", "message", "param"),
    [
        (b"", "request body is empty; expected a JSON object", None),
        (b"[1, 2]", "invalid request: Expected `object`, got `array`", None),
        (b'{"model": "m"}', "invalid request: Object missing required field `messages`", "messages"),
        (
            b'{"model": "m", "messages": [], "max_tokens": "ten"}',
            "invalid request: Expected `int | null`, got `str` - at `$.max_tokens`",
            "max_tokens",
        ),
        (
            b'{"model": "m", "messages": [{"role": "wizard", "content": "x"}]}',
            "invalid request: Invalid enum value 'wizard' - at `$.messages[0].role`",
            "messages[0].role",
        ),
        (
            b'{"model": "m", "messages": [{"content": "x"}]}',
            "invalid request: Object missing required field `role` - at `$.messages[0]`",
            "messages[0].role",
        ),
        (
            b'{"model": "m", "messages": ["hi"]}',
            "invalid request: Expected `object`, got `str` - at `$.messages[0]`",
            "messages[0]",
        ),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": 3}]}',
            "invalid request: Expected `str | array | null`, got `int` - at `$.messages[0].content`",
            "messages[0].content",
        ),
    ],
)
def test_decode_errors_name_the_field(body: bytes, message: str, param: str | None) -> None:
    err = decode_error(body)
    assert (err.message, err.param) == (message, param)


def test_malformed_json() -> None:
    err = decode_error(b'{"model": "x", "messages": [')
    assert err.message.startswith("request body is not valid JSON: ") and err.param is None


@pytest.mark.parametrize("role", ["system", "developer", "user", "assistant", "tool", "function"])
def test_every_role_the_templates_know_decodes(role: str) -> None:
    req = chat(messages=[{"role": role, "content": "x"}])
    assert req.messages[0].role == role
    validate_request(req)


# ---------------------------------------------------------------- the request alone


@pytest.mark.parametrize(
    ("kw", "param", "message"),
    [
        ({"model": ""}, "model", "model must not be empty"),
        ({"max_tokens": 0}, "max_tokens", "max_tokens must be at least 1"),
        ({"temperature": -0.1}, "temperature", "temperature must be between 0 and 2"),
        ({"temperature": 2.5}, "temperature", "temperature must be between 0 and 2"),
        ({"top_p": 0}, "top_p", "top_p must be in (0, 1]"),
        ({"top_p": 1.5}, "top_p", "top_p must be in (0, 1]"),
        ({"top_k": 0}, "top_k", "top_k must be -1 or at least 1"),
        ({"n": 3}, "n", "only n=1 is supported"),
        ({"min_tokens": -1}, "min_tokens", "min_tokens must be >= 0"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens", "min_tokens must not exceed max_tokens"),
        ({"presence_penalty": 2.5}, "presence_penalty", "presence_penalty must be between -2 and 2"),
        ({"frequency_penalty": -3}, "frequency_penalty", "frequency_penalty must be between -2 and 2"),
        ({"stop": [str(i) for i in range(17)]}, "stop", "at most 16 stop sequences are allowed"),
        ({"stop": ["a", ""]}, "stop", "stop sequences must not be empty"),
        ({"stop": ""}, "stop", "stop sequences must not be empty"),
        (
            {"nvext": {"router_config_override": {"overlap_score_weight": -1}}},
            "nvext.router_config_override.overlap_score_weight",
            "overlap_score_weight must be >= 0",
        ),
        (
            {"nvext": {"router_config_override": {"router_temperature": -0.5}}},
            "nvext.router_config_override.router_temperature",
            "router_temperature must be >= 0",
        ),
    ],
)
def test_sampling_checks_apply_to_both_endpoints(kw: dict[str, Any], param: str, message: str) -> None:
    for req in (chat(**kw), completion(**kw)):
        err = refused(req)
        assert (err.param, err.message) == (param, message)


@pytest.mark.parametrize(
    ("kw", "param", "message"),
    [
        ({"messages": []}, "messages", "messages must contain at least one message"),
        ({"max_completion_tokens": 0}, "max_completion_tokens", "max_completion_tokens must be at least 1"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs", "top_logprobs must be between 0 and 20"),
        ({"top_logprobs": 3}, "top_logprobs", "top_logprobs requires logprobs=true"),
        ({"messages": [{"role": "user"}]}, "messages[0].content", "messages[0].content is required"),
        (
            {"messages": [*HELLO, {"role": "assistant"}]},
            "messages[1].content",
            "messages[1].content is required",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages[0].content[0]",
            "messages[0].content[0]: unsupported content part type 'image_url' (only 'text')",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text"}]}]},
            "messages[0].content[1].text",
            "messages[0].content[1].text must be a string",
        ),
    ],
)
def test_chat_checks(kw: dict[str, Any], param: str, message: str) -> None:
    err = refused(chat(**kw))
    assert (err.param, err.message) == (param, message)


def test_valid_chat_forms() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    validate_request(chat(messages=[{"role": "user", "content": parts}, {"role": "assistant", "tool_calls": [call]}]))
    validate_request(chat(top_logprobs=20, logprobs=True, max_completion_tokens=1, stop=["x"] * 16, top_k=-1))


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"logprobs": 21}, "logprobs must be between 0 and 20"),
        ({"echo": True}, "echo is not supported"),
        ({"prompt": ""}, "prompt must not be empty"),
        ({"prompt": []}, "prompt must not be empty"),
        ({"prompt": [[]]}, "prompt must not be empty"),
        ({"prompt": ["a", "b"]}, "prompt must be a string, a list of token ids, or a one-element list of either"),
        ({"prompt": [1, "a"]}, "prompt must be a string, a list of token ids, or a one-element list of either"),
        ({"prompt": [-1]}, "prompt must be a string, a list of token ids, or a one-element list of either"),
        ({"prompt": [[1], [2]]}, "prompt must be a string, a list of token ids, or a one-element list of either"),
        ({"prompt": [1.5]}, "prompt must be a string, a list of token ids, or a one-element list of either"),
    ],
)
def test_completion_checks(kw: dict[str, Any], message: str) -> None:
    err = refused(completion(**kw))
    assert err.message == message
    assert err.param == ("prompt" if "prompt" in kw else next(iter(kw)))


@pytest.mark.parametrize("prompt", ["hi", [1, 2], [[3, 4]], ["x"], [0]])
def test_valid_prompt_forms(prompt: object) -> None:
    validate_request(completion(prompt=prompt, logprobs=20))


# ---------------------------------------------------------------- router knobs (body + headers)


def test_router_overrides_from_body_then_headers() -> None:
    assert router_overrides(chat(), {}) is None
    body = chat(nvext={"router_config_override": {"overlap_score_weight": 0.5}})
    assert router_overrides(body, {}) == RouterOverrides(0.5, None)
    headers = {WEIGHT_HEADER: "2", TEMPERATURE_HEADER: "0.25"}
    assert router_overrides(body, headers) == RouterOverrides(2.0, 0.25)


@pytest.mark.parametrize(
    ("name", "raw", "message"),
    [
        (TEMPERATURE_HEADER, "hot", "header x-router-temperature must be a number, got 'hot'"),
        (TEMPERATURE_HEADER, "nan", "header x-router-temperature must be a number, got 'nan'"),
        (WEIGHT_HEADER, "inf", "header x-router-overlap-weight must be a number, got 'inf'"),
        (WEIGHT_HEADER, "-1", "header x-router-overlap-weight must be >= 0, got '-1'"),
    ],
)
def test_bad_router_headers(name: str, raw: str, message: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        router_overrides(chat(), {name: raw})
    assert (info.value.status, info.value.param, info.value.message) == (400, name, message)


# ---------------------------------------------------------------- the prompt against the model


def prompt_error(req: AnyRequest, ids: list[int], vocab: int = 100, ctx: int = 10) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        check_prompt(req, ids, vocab, ctx)
    assert info.value.status == 400
    return info.value


def test_prompt_against_the_vocabulary() -> None:
    err = prompt_error(completion(prompt=[1, 100, 5]), [1, 100, 5])
    assert (err.param, err.message) == ("prompt", "token id 100 is out of the vocabulary (size 100)")
    err = prompt_error(chat(), [])
    assert (err.param, err.message) == ("prompt", "the prompt is empty after tokenization")


def test_prompt_against_the_context() -> None:
    err = prompt_error(chat(), list(range(10)))
    assert (err.param, err.code) == ("messages", "context_length_exceeded")
    assert err.message == "This model's maximum context length is 10 tokens, but the prompt has 10 tokens."
    assert prompt_error(completion(), list(range(12))).param == "prompt"
    err = prompt_error(completion(max_tokens=5), list(range(6)))
    assert (err.param, err.code) == ("max_tokens", "context_length_exceeded")
    assert err.message == (
        "max_tokens=5 is too large: the prompt has 6 tokens and the context length is 10, "
        "so at most 4 tokens can be generated."
    )


def test_output_budget() -> None:
    assert check_prompt(chat(), [1, 2, 3], 100, 10) == 7  # no limit: what the context leaves
    assert check_prompt(chat(max_tokens=9, max_completion_tokens=4), [1, 2, 3], 100, 10) == 4
    assert check_prompt(completion(), [1], 100, 100) == 16  # OpenAI's default for completions
    assert check_prompt(completion(max_tokens=4), [1, 2, 3, 4, 5, 6], 100, 10) == 4  # exactly fills it
