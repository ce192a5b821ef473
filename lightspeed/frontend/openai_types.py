"""OpenAI API request and response bodies as msgspec Structs.

Decoding a body into these types *is* the type validation: msgspec reports the exact path of a
wrong type (e.g. "Expected `int`, got `str` - at `$.max_tokens`") which becomes a 400. Range
and cross-field checks live in `validation`.

Every request Struct forbids unknown fields: a field the server does not honour is refused with a
400 naming it (`validation` says why), never silently ignored. The only fields accepted without
effect are `user` and `metadata`: caller tags that cannot change the output. Fields whose only
honoured value is the default (`n`=1, `echo`=false, `store`=false) are declared and checked.
"""

from __future__ import annotations

from typing import Any, Literal, cast

import msgspec


class StreamOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    include_usage: bool = False


# The roles chat templates know: OpenAI's, plus the legacy "function" (a tool result before "tool").
ChatRole = Literal["system", "developer", "user", "assistant", "tool", "function"]


class ChatMessage(msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=True):
    role: ChatRole
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def to_template_dict(self) -> dict[str, Any]:
        return {k: v for k, v in msgspec.structs.asdict(self).items() if v is not None}


class RouterConfigOverride(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Per-request KV-router knobs (Dynamo's `nvext.router_config_override`)."""

    overlap_score_weight: float | None = None
    router_temperature: float | None = None


class NvExt(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Dynamo-style request extensions."""

    router_config_override: RouterConfigOverride | None = None


class _SamplingFields(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Fields shared by chat and text completions (OpenAI + vLLM/Dynamo extensions)."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    store: bool = False  # nothing is stored: only false is accepted
    # Accepted and unused: caller tags, which cannot change the output.
    user: str | None = None
    metadata: dict[str, str] | None = None
    nvext: NvExt | None = None

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(_SamplingFields, frozen=True, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True

    @property
    def output_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_SamplingFields, frozen=True, kw_only=True):
    # str, list[int], or a one-element list of either (msgspec cannot type that union).
    prompt: str | list[Any]
    logprobs: int | None = None
    echo: bool = False

    @property
    def output_limit(self) -> int:
        return self.max_tokens if self.max_tokens is not None else 16  # OpenAI's default

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

    def single_prompt(self) -> object:
        """The prompt with a one-element batch unwrapped; `validation` checks what it holds."""
        prompt: object = self.prompt
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            return prompt[0]
        return prompt

    def prompt_value(self) -> str | list[int]:
        """The single prompt as text or token ids (of a request `validate_request` accepted)."""
        return cast("str | list[int]", self.single_prompt())


AnyRequest = ChatCompletionRequest | CompletionRequest


# ------------------------------------------------------------------------- responses


class PromptTokensDetails(msgspec.Struct):
    cached_tokens: int = 0


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class ChatDelta(msgspec.Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None


class ChatChunkChoice(msgspec.Struct):
    index: int
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: dict[str, Any] | None = None


class ChatCompletionChunk(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChunkChoice]
    object: str = "chat.completion.chunk"
    usage: Usage | None = None


class ChatResponseMessage(msgspec.Struct):
    role: str
    content: str


class ChatChoice(msgspec.Struct):
    index: int
    message: ChatResponseMessage
    finish_reason: str | None
    logprobs: dict[str, Any] | None = None


class ChatCompletion(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    object: str = "chat.completion"


class CompletionChoice(msgspec.Struct):
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: dict[str, Any] | None = None


class Completion(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    object: str = "text_completion"
    usage: Usage | None = None


class ModelCard(msgspec.Struct):
    id: str
    created: int
    owned_by: str = "lightspeed"
    object: str = "model"


class ModelList(msgspec.Struct):
    data: list[ModelCard]
    object: str = "list"
