"""OpenAI API request and response bodies as msgspec Structs.

Decoding a body into these types *is* the type validation: msgspec reports the exact path of a
wrong type (e.g. "Expected `int`, got `str` - at `$.max_tokens`") which becomes a 400. Range
and cross-field checks live in `validate()` methods. Unknown fields are ignored, as OpenAI does.
"""

from __future__ import annotations

from typing import Any

import msgspec

from lightspeed.errors import InvalidRequest


class StreamOptions(msgspec.Struct, frozen=True):
    include_usage: bool = False


class ChatMessage(msgspec.Struct, frozen=True, omit_defaults=True):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def to_template_dict(self) -> dict[str, Any]:
        return {k: v for k, v in msgspec.structs.asdict(self).items() if v is not None}


class RouterConfigOverride(msgspec.Struct, frozen=True):
    """Per-request KV-router knobs (Dynamo's `nvext.router_config_override`)."""

    overlap_score_weight: float | None = None
    router_temperature: float | None = None


class NvExt(msgspec.Struct, frozen=True):
    """Dynamo-style request extensions."""

    router_config_override: RouterConfigOverride | None = None


class _SamplingFields(msgspec.Struct, frozen=True, kw_only=True):
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
    user: str | None = None
    nvext: NvExt | None = None

    def validate_sampling(self) -> None:
        _check(self.model != "", "model must not be empty", "model")
        _check(self.max_tokens is None or self.max_tokens > 0, "max_tokens must be at least 1", "max_tokens")
        _check(
            self.temperature is None or 0.0 <= self.temperature <= 2.0,
            "temperature must be between 0 and 2",
            "temperature",
        )
        _check(self.top_p is None or 0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]", "top_p")
        _check(self.top_k is None or self.top_k == -1 or self.top_k >= 1, "top_k must be -1 or at least 1", "top_k")
        _check(self.n == 1, "only n=1 is supported", "n")
        _check(self.min_tokens >= 0, "min_tokens must be >= 0", "min_tokens")
        _check(
            self.max_tokens is None or self.min_tokens <= self.max_tokens,
            "min_tokens must not exceed max_tokens",
            "min_tokens",
        )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(value is None or -2.0 <= value <= 2.0, f"{name} must be between -2 and 2", name)
        _check(len(self.stop_list) <= 16, "at most 16 stop sequences are allowed", "stop")
        _check(all(self.stop_list), "stop sequences must not be empty", "stop")
        override = self.nvext.router_config_override if self.nvext is not None else None
        if override is not None:
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

    def validate(self) -> None:
        self.validate_sampling()
        _check(len(self.messages) > 0, "messages must contain at least one message", "messages")
        _check(
            self.max_completion_tokens is None or self.max_completion_tokens > 0,
            "max_completion_tokens must be at least 1",
            "max_completion_tokens",
        )
        _check(
            self.top_logprobs is None or 0 <= self.top_logprobs <= 20,
            "top_logprobs must be between 0 and 20",
            "top_logprobs",
        )
        _check(self.top_logprobs is None or self.logprobs, "top_logprobs requires logprobs=true", "top_logprobs")

    @property
    def output_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_SamplingFields, frozen=True, kw_only=True):
    # str, list[int], or a one-element list of either; validated in `prompt_value`.
    prompt: str | list[Any]
    logprobs: int | None = None
    echo: bool = False

    def validate(self) -> None:
        self.validate_sampling()
        _check(self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs must be between 0 and 20", "logprobs")
        _check(not self.echo, "echo is not supported", "echo")
        self.prompt_value()

    @property
    def output_limit(self) -> int:
        return self.max_tokens if self.max_tokens is not None else 16  # OpenAI's default

    def prompt_value(self) -> str | list[int]:
        """The single prompt as text or token ids; batches of prompts are rejected."""
        prompt: Any = self.prompt
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            _check(prompt != "", "prompt must not be empty", "prompt")
            return prompt
        _check(isinstance(prompt, list) and len(prompt) > 0, "prompt must not be empty", "prompt")
        _check(
            all(type(t) is int and t >= 0 for t in prompt),
            "prompt must be a string, a list of token ids, or a one-element list of either",
            "prompt",
        )
        return prompt


def _check(ok: bool, message: str, param: str) -> None:
    if not ok:
        raise InvalidRequest(message, param=param)


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
