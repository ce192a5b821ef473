"""Every request check, with its exact message and the field it names."""

from __future__ import annotations

import math
from typing import Any

import msgspec
import pytest

from lightspeed.errors import InvalidRequest
from lightspeed.frontend.openai_types import AnyRequest, ChatCompletionRequest, CompletionRequest
from lightspeed.frontend.validation import (
    MAX_JSON_DEPTH,
    TEMPERATURE_HEADER,
    WEIGHT_HEADER,
    check_engines,
    check_nesting,
    check_prompt,
    decode_request,
    router_overrides,
    validate_request,
)
from lightspeed.protocol import WorkerCard
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


def test_invalid_utf8_in_a_string() -> None:
    """Was a UnicodeDecodeError out of msgspec: a 500 with a traceback."""
    err = decode_error(b'{"model": "m\xff", "messages": []}')
    assert (err.message, err.param) == (
        "request body is not valid JSON: a string is not valid UTF-8 (invalid start byte)",
        None,
    )


def test_number_too_large_for_a_float() -> None:
    """JSON has no NaN or infinity; a number past the float range is refused where it stands."""
    err = decode_error(b'{"model": "m", "messages": [], "temperature": 1e999}')
    assert (err.message, err.param) == ("invalid request: Number out of range - at `$.temperature`", "temperature")


@pytest.mark.parametrize(
    ("extra", "message", "param"),
    [
        ({"tools": []}, "unsupported field 'tools': tool and function calling are not supported", "tools"),
        (
            {"tool_choice": "none"},
            "unsupported field 'tool_choice': tool and function calling are not supported",
            "tool_choice",
        ),
        ({"functions": []}, "unsupported field 'functions': tool and function calling are not supported", "functions"),
        (
            {"parallel_tool_calls": False},
            "unsupported field 'parallel_tool_calls': tool and function calling are not supported",
            "parallel_tool_calls",
        ),
        (
            {"response_format": {"type": "json_object"}},
            "unsupported field 'response_format': structured output is not supported",
            "response_format",
        ),
        ({"guided_json": {}}, "unsupported field 'guided_json': structured output is not supported", "guided_json"),
        ({"logit_bias": {"1": 5}}, "unsupported field 'logit_bias': logit bias is not supported", "logit_bias"),
        ({"best_of": 1}, "unsupported field 'best_of': only one sequence is generated per request", "best_of"),
        (
            {"repetition_penalty": 1.1},
            "unsupported field 'repetition_penalty': this sampling parameter is not supported "
            "(temperature, top_p, top_k, seed and the penalties are)",
            "repetition_penalty",
        ),
        (
            {"min_p": 0.1},
            "unsupported field 'min_p': this sampling parameter is not supported "
            "(temperature, top_p, top_k, seed and the penalties are)",
            "min_p",
        ),
        (
            {"chat_template_kwargs": {}},
            "unsupported field 'chat_template_kwargs': the model's own chat template is always applied as is",
            "chat_template_kwargs",
        ),
        (
            {"include_stop_str_in_output": True},
            "unsupported field 'include_stop_str_in_output': stop strings are always removed from the output",
            "include_stop_str_in_output",
        ),
        (
            {"zzz": 1},
            "unsupported field 'zzz': this server does not know the field; it refuses it rather than ignore it",
            "zzz",
        ),
        (
            {"messages": [{"role": "user", "content": "x", "refusal": None}]},
            "unsupported field 'refusal': this server does not know the field; it refuses it rather than ignore it",
            "messages[0].refusal",
        ),
        (
            {"stream_options": {"include_usage": True, "continuous_usage_stats": True}},
            "unsupported field 'continuous_usage_stats': this server does not know the field; "
            "it refuses it rather than ignore it",
            "stream_options.continuous_usage_stats",
        ),
        (
            {"nvext": {"router_config_override": {"overlap_score_weight": 1, "extra": 2}}},
            "unsupported field 'extra': this server does not know the field; it refuses it rather than ignore it",
            "nvext.router_config_override.extra",
        ),
    ],
)
def test_unhonoured_fields_are_refused_by_name(extra: dict[str, Any], message: str, param: str) -> None:
    """Were accepted with a 200 and no effect."""
    err = decode_error(msgspec.json.encode({"model": "m", "messages": HELLO, **extra}))
    assert (err.message, err.param) == (message, param)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"suffix": "x"}, "unsupported field 'suffix': insertion (suffix) is not supported"),
        ({"echo": True, "best_of": 2}, "unsupported field 'best_of': only one sequence is generated per request"),
        (
            {"messages": HELLO},
            "unsupported field 'messages': this server does not know the field; it refuses it rather than ignore it",
        ),
    ],
)
def test_unhonoured_completion_fields_are_refused(extra: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        decode_request(COMPLETION, msgspec.json.encode({"model": "m", "prompt": "hi", **extra}))
    assert info.value.message == message


def test_caller_tags_are_accepted() -> None:
    """The only fields accepted without effect: they cannot change the output."""
    req = chat(user="u1", metadata={"team": "a"})
    validate_request(req)
    assert (req.user, req.metadata) == ("u1", {"team": "a"})


# ---------------------------------------------------------------- nesting


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def test_deep_nesting_is_refused_before_decoding() -> None:
    """Was a RecursionError out of msgspec (a 500) from about 1,000 levels."""
    for depth in (MAX_JSON_DEPTH, 3000, 200_000):
        body = b'{"model": "m", "messages": ' + nested(depth) + b"}"
        err = decode_error(body)
        assert (err.message, err.param) == (f"request body is nested more than {MAX_JSON_DEPTH} levels deep", None)


def test_nesting_at_the_limit_is_decoded() -> None:
    body = b'{"model": "m", "messages": [], "metadata": {"a": ' + nested(MAX_JSON_DEPTH - 2) + b"}}"
    err = decode_error(body)  # past the nesting check: msgspec types it
    assert err.message == "invalid request: Expected `str`, got `array` - at `$.metadata[...]`"


@pytest.mark.parametrize(
    "raw",
    [
        b'{"a": "' + b"[" * 500 + b'"}',  # brackets inside a string do not nest
        b'{"a": "\\"' + b"{" * 500 + b'"}',  # nor after escaped quotes
        b"[" + b"[[],{}]," * 5000 + b"[]]",  # wide, not deep
        b"[" * 10 + b"]" * 3,  # malformed: left to the decoder
    ],
)
def test_nesting_scan_counts_only_real_depth(raw: bytes) -> None:
    check_nesting(raw, None)


def test_tool_call_arguments_are_bounded_like_the_body() -> None:
    """Preprocessing json.loads the arguments for the template: was a RecursionError (500)."""
    arguments = "[" * 5000 + "]" * 5000
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": arguments}}
    err = refused(chat(messages=[*HELLO, {"role": "assistant", "tool_calls": [call]}]))
    param = "messages[1].tool_calls[0].function.arguments"
    assert (err.param, err.message) == (param, f"{param} is nested more than {MAX_JSON_DEPTH} levels deep")


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
        ({"max_tokens": 0}, "max_tokens", "max_tokens must be between 1 and 2147483647"),
        ({"max_tokens": 2**70}, "max_tokens", "max_tokens must be between 1 and 2147483647"),
        ({"temperature": -0.1}, "temperature", "temperature must be between 0 and 2"),
        ({"temperature": 2.5}, "temperature", "temperature must be between 0 and 2"),
        ({"top_p": 0}, "top_p", "top_p must be in (0, 1]"),
        ({"top_p": 1.5}, "top_p", "top_p must be in (0, 1]"),
        ({"top_k": 0}, "top_k", "top_k must be -1 or between 1 and 2147483647"),
        ({"top_k": 2**31}, "top_k", "top_k must be -1 or between 1 and 2147483647"),
        ({"seed": 2**64}, "seed", "seed must be between -9223372036854775808 and 18446744073709551615"),
        ({"seed": -(2**63) - 1}, "seed", "seed must be between -9223372036854775808 and 18446744073709551615"),
        ({"n": 3}, "n", "only n=1 is supported"),
        ({"n": 2**70}, "n", "only n=1 is supported"),
        ({"store": True}, "store", "store=true is not supported: completions are not stored"),
        ({"min_tokens": -1}, "min_tokens", "min_tokens must be between 0 and 2147483647"),
        ({"min_tokens": 2**80}, "min_tokens", "min_tokens must be between 0 and 2147483647"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens", "min_tokens must not exceed the output limit (2)"),
        ({"stop_token_ids": [2**64]}, "stop_token_ids", "stop_token_ids must be token ids between 0 and 2147483647"),
        ({"stop_token_ids": [1, -1]}, "stop_token_ids", "stop_token_ids must be token ids between 0 and 2147483647"),
        ({"stop_token_ids": [7] * 257}, "stop_token_ids", "at most 256 stop_token_ids are allowed"),
        ({"presence_penalty": 2.5}, "presence_penalty", "presence_penalty must be between -2 and 2"),
        ({"frequency_penalty": -3}, "frequency_penalty", "frequency_penalty must be between -2 and 2"),
        ({"stop": [str(i) for i in range(17)]}, "stop", "at most 16 stop sequences are allowed"),
        ({"stop": ["a", ""]}, "stop", "stop sequences must not be empty"),
        ({"stop": ""}, "stop", "stop sequences must not be empty"),
        (
            {"nvext": {"router_config_override": {"overlap_score_weight": -1}}},
            "nvext.router_config_override.overlap_score_weight",
            "overlap_score_weight must be a finite number >= 0",
        ),
        (
            {"nvext": {"router_config_override": {"router_temperature": -0.5}}},
            "nvext.router_config_override.router_temperature",
            "router_temperature must be a finite number >= 0",
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
        (
            {"max_completion_tokens": 0},
            "max_completion_tokens",
            "max_completion_tokens must be between 1 and 2147483647",
        ),
        (
            {"max_completion_tokens": 2**64},
            "max_completion_tokens",
            "max_completion_tokens must be between 1 and 2147483647",
        ),
        (
            {"min_tokens": 5, "max_tokens": 9, "max_completion_tokens": 4},
            "min_tokens",
            "min_tokens must not exceed the output limit (4)",
        ),
        ({"top_logprobs": 2**70, "logprobs": True}, "top_logprobs", "top_logprobs must be between 0 and 20"),
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


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("temperature", "temperature must be between 0 and 2"),
        ("top_p", "top_p must be in (0, 1]"),
        ("presence_penalty", "presence_penalty must be between -2 and 2"),
        ("frequency_penalty", "frequency_penalty must be between -2 and 2"),
    ],
)
def test_non_finite_floats_are_refused(name: str, value: float, message: str) -> None:
    """JSON cannot carry them, but the checks must not let them through either."""
    err = refused(msgspec.structs.replace(chat(), **{name: value}))
    assert (err.param, err.message) == (name, message)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_router_override_is_refused(value: float) -> None:
    override = {"router_config_override": {"overlap_score_weight": 1.0}}
    req = chat(nvext=override)
    assert req.nvext is not None and req.nvext.router_config_override is not None
    bad = msgspec.structs.replace(req.nvext.router_config_override, overlap_score_weight=value)
    err = refused(msgspec.structs.replace(req, nvext=msgspec.structs.replace(req.nvext, router_config_override=bad)))
    assert err.message == "overlap_score_weight must be a finite number >= 0"


def test_integer_bounds_are_inclusive() -> None:
    validate_request(completion(seed=2**64 - 1, top_k=2**31 - 1, max_tokens=2**31 - 1, min_tokens=2**31 - 1))
    validate_request(completion(seed=-(2**63), stop_token_ids=[2**31 - 1] * 256))


def test_valid_chat_forms() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    validate_request(chat(messages=[{"role": "user", "content": parts}, {"role": "assistant", "tool_calls": [call]}]))
    validate_request(chat(top_logprobs=20, logprobs=True, max_completion_tokens=1, stop=["x"] * 16, top_k=-1))


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"logprobs": 21}, "logprobs must be between 0 and 20"),
        ({"logprobs": 2**70}, "logprobs must be between 0 and 20"),
        ({"min_tokens": 17}, "min_tokens must not exceed the output limit (16)"),
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
        (WEIGHT_HEADER, "-inf", "header x-router-overlap-weight must be a number, got '-inf'"),
        (WEIGHT_HEADER, "1e999", "header x-router-overlap-weight must be a number, got '1e999'"),
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


def test_stop_token_ids_against_the_vocabulary() -> None:
    err = prompt_error(completion(stop_token_ids=[3, 100]), [1, 2])
    assert (err.param, err.message) == ("stop_token_ids", "stop token id 100 is out of the vocabulary (size 100)")
    assert check_prompt(completion(stop_token_ids=[99], max_tokens=2), [1, 2], 100, 10) == 2


def test_min_tokens_against_the_context() -> None:
    """Without max_tokens the context is the limit: a min_tokens past it cannot be met."""
    err = prompt_error(chat(min_tokens=8), [1, 2, 3])
    assert (err.param, err.code) == ("min_tokens", "context_length_exceeded")
    assert err.message == (
        "min_tokens=8 is too large: the prompt has 3 tokens and the context length is 10, "
        "so at most 7 tokens can be generated."
    )
    assert check_prompt(chat(min_tokens=7), [1, 2, 3], 100, 10) == 7


# ---------------------------------------------------------------- what the engines can do


def card(engine: str, instance: str = "w1") -> WorkerCard:
    return WorkerCard(instance_id=instance, model="m", address="127.0.0.1:1", engine=engine)


@pytest.mark.parametrize("req", [chat(logprobs=True), chat(logprobs=True, top_logprobs=2), completion(logprobs=0)])
def test_logprobs_are_refused_on_the_mocker(req: AnyRequest) -> None:
    """The mocker computes none: the response used to carry logprobs=null with a 200."""
    for workers in ([card("mocker")], [card("native"), card("mocker", "w2")]):
        with pytest.raises(InvalidRequest) as info:
            check_engines(req, workers)
        assert (info.value.status, info.value.param, info.value.message) == (
            400,
            "logprobs",
            "logprobs are not available: model 'm' is served by the mocker engine, which computes no log probabilities",
        )


def test_engines_that_can_serve_the_request() -> None:
    check_engines(chat(logprobs=True, top_logprobs=2), [card("native")])
    check_engines(completion(logprobs=3), [card("native"), card("native", "w2")])
    check_engines(chat(), [card("mocker")])
    check_engines(completion(), [card("mocker")])
