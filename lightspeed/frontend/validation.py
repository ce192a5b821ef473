"""Every check of a client's request, in one place; preprocess and pipeline only transform.

Three steps, each raising `InvalidRequest` (400) that names the offending field:
- `decode_request`: the body into an `openai_types` Struct. msgspec checks every type (a chat
  role is a `Literal`, so an unknown role fails here) and names the path of a wrong one.
- `validate_request` (+ `router_overrides` for the headers): what types cannot say (ranges,
  fields that exclude each other, stop lists, message contents, the prompt's form), once, before
  any work is done.
- `check_prompt`: the tokenized prompt against the model's vocabulary and context, the only
  checks that need the model; it also yields the output budget those limits leave.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, TypeVar

import msgspec

from lightspeed.errors import InvalidRequest
from lightspeed.frontend.openai_types import (
    AnyRequest,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    NvExt,
)
from lightspeed.router.selector import RouterOverrides

WEIGHT_HEADER = "x-router-overlap-weight"
TEMPERATURE_HEADER = "x-router-temperature"
MAX_STOP_SEQUENCES = 16
MAX_LOGPROBS = 20

_Request = TypeVar("_Request")
# msgspec ends a nested error with "- at `$.messages[0].role`"; a missing field is named in the text.
_ERROR_PATH = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")
_MISSING_FIELD = re.compile(r"missing required field `(?P<field>[^`]+)`")


def decode_request(decoder: msgspec.json.Decoder[_Request], body: bytes) -> _Request:
    """The typed request, or a 400 naming what is malformed (the field, when there is one)."""
    if not body:
        raise InvalidRequest("request body is empty; expected a JSON object")
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as err:
        raise InvalidRequest(f"invalid request: {err}", param=_error_param(str(err))) from None
    except msgspec.DecodeError as err:
        raise InvalidRequest(f"request body is not valid JSON: {err}") from None


def _error_param(message: str) -> str | None:
    at = _ERROR_PATH.search(message)
    path = at["path"] if at else ""
    missing = _MISSING_FIELD.search(message)
    if missing:
        path = f"{path}.{missing['field']}" if path else missing["field"]
    return path or None


def validate_request(req: AnyRequest) -> None:
    """Everything about a decoded request that does not depend on the model."""
    _check_sampling(req)
    _check_router_override(req.nvext)
    if isinstance(req, ChatCompletionRequest):
        _check_chat(req)
    else:
        _check_completion(req)


def _check(ok: bool, message: str, param: str) -> None:
    if not ok:
        raise InvalidRequest(message, param=param)


def _check_sampling(req: AnyRequest) -> None:
    _check(req.model != "", "model must not be empty", "model")
    _check(req.max_tokens is None or req.max_tokens > 0, "max_tokens must be at least 1", "max_tokens")
    _check(
        req.temperature is None or 0.0 <= req.temperature <= 2.0, "temperature must be between 0 and 2", "temperature"
    )
    _check(req.top_p is None or 0.0 < req.top_p <= 1.0, "top_p must be in (0, 1]", "top_p")
    _check(req.top_k is None or req.top_k == -1 or req.top_k >= 1, "top_k must be -1 or at least 1", "top_k")
    _check(req.n == 1, "only n=1 is supported", "n")
    _check(req.min_tokens >= 0, "min_tokens must be >= 0", "min_tokens")
    _check(
        req.max_tokens is None or req.min_tokens <= req.max_tokens,
        "min_tokens must not exceed max_tokens",
        "min_tokens",
    )
    for name, value in (("presence_penalty", req.presence_penalty), ("frequency_penalty", req.frequency_penalty)):
        _check(value is None or -2.0 <= value <= 2.0, f"{name} must be between -2 and 2", name)
    stops = req.stop_list
    _check(len(stops) <= MAX_STOP_SEQUENCES, f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed", "stop")
    _check(all(stops), "stop sequences must not be empty", "stop")


def _check_router_override(nvext: NvExt | None) -> None:
    override = nvext.router_config_override if nvext is not None else None
    if override is None:
        return
    _check(
        override.overlap_score_weight is None or override.overlap_score_weight >= 0,
        "overlap_score_weight must be >= 0",
        "nvext.router_config_override.overlap_score_weight",
    )
    _check(
        override.router_temperature is None or override.router_temperature >= 0,
        "router_temperature must be >= 0",
        "nvext.router_config_override.router_temperature",
    )


def _check_chat(req: ChatCompletionRequest) -> None:
    _check(len(req.messages) > 0, "messages must contain at least one message", "messages")
    _check(
        req.max_completion_tokens is None or req.max_completion_tokens > 0,
        "max_completion_tokens must be at least 1",
        "max_completion_tokens",
    )
    _check(
        req.top_logprobs is None or 0 <= req.top_logprobs <= MAX_LOGPROBS,
        f"top_logprobs must be between 0 and {MAX_LOGPROBS}",
        "top_logprobs",
    )
    _check(req.top_logprobs is None or req.logprobs, "top_logprobs requires logprobs=true", "top_logprobs")
    for index, message in enumerate(req.messages):
        _check_message(message, f"messages[{index}]")


def _check_message(message: ChatMessage, param: str) -> None:
    """Content is required (except on an assistant turn that only calls tools) and may be a
    list of text parts; the role was checked by its `Literal` type when decoding."""
    content = message.content
    if content is None:
        _check(
            message.role == "assistant" and bool(message.tool_calls), f"{param}.content is required", f"{param}.content"
        )
    elif not isinstance(content, str):
        for j, part in enumerate(content):
            _check_text_part(part, f"{param}.content[{j}]")


def _check_text_part(part: dict[str, Any], param: str) -> None:
    kind = part.get("type")
    _check(kind == "text", f"{param}: unsupported content part type {kind!r} (only 'text')", param)
    _check(isinstance(part.get("text"), str), f"{param}.text must be a string", f"{param}.text")


def _check_completion(req: CompletionRequest) -> None:
    _check(
        req.logprobs is None or 0 <= req.logprobs <= MAX_LOGPROBS,
        f"logprobs must be between 0 and {MAX_LOGPROBS}",
        "logprobs",
    )
    _check(not req.echo, "echo is not supported", "echo")
    prompt = req.single_prompt()
    if isinstance(prompt, str):
        _check(prompt != "", "prompt must not be empty", "prompt")
        return
    _check(isinstance(prompt, list) and len(prompt) > 0, "prompt must not be empty", "prompt")
    _check(
        isinstance(prompt, list) and all(type(t) is int and t >= 0 for t in prompt),
        "prompt must be a string, a list of token ids, or a one-element list of either",
        "prompt",
    )


def router_overrides(req: AnyRequest, headers: Mapping[str, str]) -> RouterOverrides | None:
    """KV-router knobs for this request: the body's `nvext.router_config_override` (checked by
    `validate_request`), then the x-router-* headers, which win."""
    override = req.nvext.router_config_override if req.nvext is not None else None
    weight = override.overlap_score_weight if override is not None else None
    temperature = override.router_temperature if override is not None else None
    weight = _header_knob(headers, WEIGHT_HEADER, weight)
    temperature = _header_knob(headers, TEMPERATURE_HEADER, temperature)
    if weight is None and temperature is None:
        return None
    return RouterOverrides(weight, temperature)


def _header_knob(headers: Mapping[str, str], name: str, default: float | None) -> float | None:
    raw = headers.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    _check(math.isfinite(value), f"header {name} must be a number, got {raw!r}", name)
    _check(value >= 0, f"header {name} must be >= 0, got {raw!r}", name)
    return value


def check_prompt(req: AnyRequest, token_ids: list[int], vocab_size: int, context_length: int) -> int:
    """Check the tokenized prompt against the model; returns how many tokens it may generate
    (the request's limit, or all the context leaves)."""
    _check(len(token_ids) > 0, "the prompt is empty after tokenization", "prompt")
    # Text always tokenizes inside the vocabulary: in practice this catches token-id prompts.
    top = max(token_ids)
    _check(top < vocab_size, f"token id {top} is out of the vocabulary (size {vocab_size})", "prompt")
    prompt_len = len(token_ids)
    if prompt_len >= context_length:
        raise InvalidRequest(
            f"This model's maximum context length is {context_length} tokens, but the prompt has {prompt_len} tokens.",
            param="messages" if isinstance(req, ChatCompletionRequest) else "prompt",
            code="context_length_exceeded",
        )
    limit = req.output_limit
    if limit is None:
        return context_length - prompt_len
    if prompt_len + limit > context_length:
        raise InvalidRequest(
            f"max_tokens={limit} is too large: the prompt has {prompt_len} tokens and the context "
            f"length is {context_length}, so at most {context_length - prompt_len} tokens can be generated.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return limit
