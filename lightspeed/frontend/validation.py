"""Every check of a client's request, in one place; preprocess and pipeline only transform.

Four steps, each raising `InvalidRequest` (400) that names the offending field:
- `decode_request`: the body into an `openai_types` Struct. Nesting is bounded first (a cheap
  scan), then msgspec checks every type (a chat role is a `Literal`, so an unknown role fails
  here), refuses unknown fields (with why, for the ones clients commonly send) and names the
  path of a wrong one.
- `validate_request` (+ `router_overrides` for the headers): what types cannot say (ranges,
  fields that exclude each other, stop lists, message contents, the prompt's form), once, before
  any work is done. Every integer is bounded, so nothing a client sends overflows the 64-bit
  integers of the request plane.
- `check_engines`: what the engines serving the model can do (the mocker computes no logprobs).
- `check_prompt`: the tokenized prompt against the model's vocabulary and context, the only
  checks that need the model; it also yields the output budget those limits leave.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import msgspec
import numpy as np

from lightspeed.errors import InvalidRequest
from lightspeed.frontend.openai_types import (
    AnyRequest,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    NvExt,
)
from lightspeed.protocol import MAX_STOP_TOKEN_IDS, WorkerCard
from lightspeed.router.selector import RouterOverrides

WEIGHT_HEADER = "x-router-overlap-weight"
TEMPERATURE_HEADER = "x-router-temperature"
MAX_STOP_SEQUENCES = 16
MAX_LOGPROBS = 20
# Token counts and ids: no model comes near; an int32 bound keeps every count a machine integer.
MAX_TOKEN_COUNT = 2**31 - 1
# Seeds: what both engines take (torch seeds span [-2**63, 2**64)); msgpack carries the same.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
# JSON nesting, in the body and in tool-call arguments: real requests stay under ~8 levels;
# decoders (msgspec, json) recurse per level and fail near the interpreter's recursion limit.
MAX_JSON_DEPTH = 64
# Engines that compute logprobs: the mocker samples no distribution, so it has none to report.
LOGPROB_ENGINES = frozenset({"native"})

# Fields clients commonly send that this server does not honour, with why: the 400 says so.
# Any other unknown field is refused too, with a generic reason.
_TOOLS = "tool and function calling are not supported"
_STRUCTURED = "structured output is not supported"
_SAMPLING = "this sampling parameter is not supported (temperature, top_p, top_k, seed and the penalties are)"
_TEMPLATE = "the model's own chat template is always applied as is"
UNSUPPORTED_FIELDS: dict[str, str] = {
    **dict.fromkeys(("tools", "tool_choice", "parallel_tool_calls", "functions", "function_call"), _TOOLS),
    **dict.fromkeys(("response_format", "guided_decoding_backend", "structured_outputs"), _STRUCTURED),
    **dict.fromkeys(("repetition_penalty", "min_p", "top_a", "length_penalty", "typical_p"), _SAMPLING),
    **dict.fromkeys(("chat_template", "chat_template_kwargs", "continue_final_message", "documents"), _TEMPLATE),
    "logit_bias": "logit bias is not supported",
    "best_of": "only one sequence is generated per request",
    "use_beam_search": "beam search is not supported",
    "suffix": "insertion (suffix) is not supported",
    "prompt_logprobs": "prompt logprobs are not supported",
    "include_stop_str_in_output": "stop strings are always removed from the output",
    "skip_special_tokens": "special tokens are always skipped in the output text",
    "service_tier": "there are no service tiers",
    "modalities": "only text output is supported",
    "audio": "only text output is supported",
}
_UNKNOWN_REASON = "this server does not know the field; it refuses it rather than ignore it"

_Request = TypeVar("_Request")
# msgspec ends a nested error with "- at `$.messages[0].role`"; a missing or unknown field is
# named in the text.
_ERROR_PATH = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")
_NAMED_FIELD = re.compile(r"(?:missing required|contains unknown) field `(?P<field>[^`]+)`")
_UNKNOWN_FIELD = re.compile(r"contains unknown field `(?P<field>[^`]+)`")
# For the nesting scan: JSON strings (brackets inside them do not nest), and every byte that is
# not a bracket.
_JSON_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_BRACKET_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # +1 / -1 as int8


def decode_request(decoder: msgspec.json.Decoder[_Request], body: bytes) -> _Request:
    """The typed request, or a 400 naming what is malformed (the field, when there is one)."""
    if not body:
        raise InvalidRequest("request body is empty; expected a JSON object")
    check_nesting(body, None)
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as err:
        raise _validation_error(str(err)) from None
    except msgspec.DecodeError as err:
        raise InvalidRequest(f"request body is not valid JSON: {err}") from None
    except UnicodeDecodeError as err:  # msgspec checks UTF-8 as it builds each string
        raise InvalidRequest(f"request body is not valid JSON: a string is not valid UTF-8 ({err.reason})") from None


def check_nesting(raw: bytes, param: str | None) -> None:
    """Refuse JSON nested deeper than `MAX_JSON_DEPTH`, before a recursive decoder sees it.

    One linear pass at C speed (tens of ms for a hostile 8 MiB body): strings are cut out and
    every other non-bracket byte dropped (regex, translate), then the running depth is a cumsum
    of +1/-1 steps. Malformed JSON may miscount; the decoder refuses it anyway."""
    brackets = _JSON_STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    if len(brackets) <= MAX_JSON_DEPTH:  # the common case: too few brackets to nest that deep
        return
    steps = np.frombuffer(brackets.translate(_BRACKET_STEPS), dtype=np.int8)
    too_deep = int(np.cumsum(steps, dtype=np.int64).max()) > MAX_JSON_DEPTH
    where = f"{param} is" if param is not None else "request body is"
    _check(not too_deep, f"{where} nested more than {MAX_JSON_DEPTH} levels deep", param)


def _validation_error(message: str) -> InvalidRequest:
    param = _error_param(message)
    unknown = _UNKNOWN_FIELD.search(message)
    if unknown is None:
        return InvalidRequest(f"invalid request: {message}", param=param)
    name = unknown["field"]
    reason = UNSUPPORTED_FIELDS.get(name, _STRUCTURED if name.startswith("guided_") else _UNKNOWN_REASON)
    return InvalidRequest(f"unsupported field '{name}': {reason}", param=param)


def _error_param(message: str) -> str | None:
    at = _ERROR_PATH.search(message)
    path = at["path"] if at else ""
    named = _NAMED_FIELD.search(message)
    if named:
        path = f"{path}.{named['field']}" if path else named["field"]
    return path or None


def validate_request(req: AnyRequest) -> None:
    """Everything about a decoded request that does not depend on the model."""
    _check(req.model != "", "model must not be empty", "model")
    _check_counts(req)
    _check_sampling(req)
    _check_stops(req)
    _check_router_override(req.nvext)
    if isinstance(req, ChatCompletionRequest):
        _check_chat(req)
    else:
        _check_completion(req)


def _check(ok: bool, message: str, param: str | None) -> None:
    if not ok:
        raise InvalidRequest(message, param=param)


def _check_range(value: int | None, low: int, high: int, name: str) -> None:
    _check(value is None or low <= value <= high, f"{name} must be between {low} and {high}", name)


def _check_counts(req: AnyRequest) -> None:
    """Every integer field, bounded (also for the 64-bit integers of the request plane)."""
    _check_range(req.max_tokens, 1, MAX_TOKEN_COUNT, "max_tokens")
    if isinstance(req, ChatCompletionRequest):
        _check_range(req.max_completion_tokens, 1, MAX_TOKEN_COUNT, "max_completion_tokens")
    _check_range(req.min_tokens, 0, MAX_TOKEN_COUNT, "min_tokens")
    limit = req.output_limit  # max_completion_tokens, max_tokens, or the default of completions
    _check(
        limit is None or req.min_tokens <= limit, f"min_tokens must not exceed the output limit ({limit})", "min_tokens"
    )
    top_k = req.top_k
    _check(
        top_k is None or top_k == -1 or 1 <= top_k <= MAX_TOKEN_COUNT,
        f"top_k must be -1 or between 1 and {MAX_TOKEN_COUNT}",
        "top_k",
    )
    _check_range(req.seed, SEED_MIN, SEED_MAX, "seed")
    _check(req.n == 1, "only n=1 is supported", "n")
    _check(not req.store, "store=true is not supported: completions are not stored", "store")


def _check_sampling(req: AnyRequest) -> None:
    # Written so that NaN fails too (every comparison with NaN is false); JSON cannot carry NaN
    # or infinity, but a number too large for a float is refused when decoding.
    _check(
        req.temperature is None or 0.0 <= req.temperature <= 2.0, "temperature must be between 0 and 2", "temperature"
    )
    _check(req.top_p is None or 0.0 < req.top_p <= 1.0, "top_p must be in (0, 1]", "top_p")
    for name, value in (("presence_penalty", req.presence_penalty), ("frequency_penalty", req.frequency_penalty)):
        _check(value is None or -2.0 <= value <= 2.0, f"{name} must be between -2 and 2", name)


def _check_stops(req: AnyRequest) -> None:
    stops = req.stop_list
    _check(len(stops) <= MAX_STOP_SEQUENCES, f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed", "stop")
    _check(all(stops), "stop sequences must not be empty", "stop")
    ids = req.stop_token_ids or []
    # The engine refuses longer lists too, but as a failed request: the frontend answers first.
    _check(len(ids) <= MAX_STOP_TOKEN_IDS, f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids are allowed", "stop_token_ids")
    _check(
        all(0 <= i <= MAX_TOKEN_COUNT for i in ids),
        f"stop_token_ids must be token ids between 0 and {MAX_TOKEN_COUNT}",
        "stop_token_ids",
    )


def _check_router_override(nvext: NvExt | None) -> None:
    override = nvext.router_config_override if nvext is not None else None
    if override is None:
        return
    prefix = "nvext.router_config_override"
    for name, value in (
        ("overlap_score_weight", override.overlap_score_weight),
        ("router_temperature", override.router_temperature),
    ):
        _check(value is None or _finite_non_negative(value), f"{name} must be a finite number >= 0", f"{prefix}.{name}")


def _finite_non_negative(value: float) -> bool:
    return math.isfinite(value) and value >= 0


def _check_chat(req: ChatCompletionRequest) -> None:
    _check(len(req.messages) > 0, "messages must contain at least one message", "messages")
    _check_range(req.top_logprobs, 0, MAX_LOGPROBS, "top_logprobs")
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
    for k, call in enumerate(message.tool_calls or []):
        _check_tool_call(call, f"{param}.tool_calls[{k}]")


def _check_text_part(part: dict[str, Any], param: str) -> None:
    kind = part.get("type")
    _check(kind == "text", f"{param}: unsupported content part type {kind!r} (only 'text')", param)
    _check(isinstance(part.get("text"), str), f"{param}.text must be a string", f"{param}.text")


def _check_tool_call(call: dict[str, Any], param: str) -> None:
    """Arguments arrive as a JSON string that preprocessing parses for the chat template: bound
    its nesting like the body's."""
    function = call.get("function")
    arguments = function.get("arguments") if isinstance(function, dict) else None
    if isinstance(arguments, str):
        check_nesting(arguments.encode(), f"{param}.function.arguments")


def _check_completion(req: CompletionRequest) -> None:
    _check_range(req.logprobs, 0, MAX_LOGPROBS, "logprobs")
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


def check_engines(req: AnyRequest, workers: Iterable[WorkerCard]) -> None:
    """Refuse what the engines serving the model cannot do, rather than answer without it:
    logprobs unless every worker the request may be routed to computes them."""
    if req.num_logprobs is None:
        return
    lacking = sorted({w.engine for w in workers if w.engine not in LOGPROB_ENGINES})
    _check(
        not lacking,
        f"logprobs are not available: model {req.model!r} is served by the {', '.join(lacking)} engine, "
        "which computes no log probabilities",
        "logprobs",
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
    stop_ids = req.stop_token_ids or []
    top_stop = max(stop_ids, default=0)
    _check(
        top_stop < vocab_size,
        f"stop token id {top_stop} is out of the vocabulary (size {vocab_size})",
        "stop_token_ids",
    )
    prompt_len = len(token_ids)
    if prompt_len >= context_length:
        raise InvalidRequest(
            f"This model's maximum context length is {context_length} tokens, but the prompt has {prompt_len} tokens.",
            param="messages" if isinstance(req, ChatCompletionRequest) else "prompt",
            code="context_length_exceeded",
        )
    limit = req.output_limit
    left = context_length - prompt_len
    name, wanted = ("max_tokens", limit) if limit is not None else ("min_tokens", req.min_tokens)
    if wanted > left:  # min_tokens <= limit was checked: only one of them can exceed the context
        raise InvalidRequest(
            f"{name}={wanted} is too large: the prompt has {prompt_len} tokens and the context "
            f"length is {context_length}, so at most {left} tokens can be generated.",
            param=name,
            code="context_length_exceeded",
        )
    return left if limit is None else limit
