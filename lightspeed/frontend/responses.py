"""Build OpenAI response bodies (streamed chunks and whole responses) from pipeline deltas."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import msgspec

from lightspeed.frontend.openai_types import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatResponseMessage,
    Completion,
    CompletionChoice,
    PromptTokensDetails,
    Usage,
)
from lightspeed.frontend.pipeline import Delta, Generation
from lightspeed.protocol import TokenLogprob

_json = msgspec.json.Encoder()


class TokenText:
    """Token id -> display text for logprobs (cached: the same ids recur constantly)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._tok.decode([token_id], skip_special_tokens=False)
            self._cache[token_id] = text
        return text


@dataclass
class ResponseBuilder:
    chat: bool
    gen: Generation
    model: str
    token_text: TokenText
    created: int = field(default_factory=lambda: int(time.time()))
    text_parts: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None

    def usage(self) -> Usage:
        g = self.gen
        return Usage(
            g.prompt_tokens,
            g.completion_tokens,
            g.prompt_tokens + g.completion_tokens,
            PromptTokensDetails(cached_tokens=g.cached_tokens),
        )

    # -------------------------------------------------------------------- streaming

    def role_chunk(self) -> bytes:
        choice = ChatChunkChoice(0, ChatDelta(role="assistant", content=""))
        return _json.encode(ChatCompletionChunk(self.gen.request_id, self.created, self.model, [choice]))

    def delta_chunk(self, delta: Delta) -> bytes:
        lp = self._format_logprobs(delta.logprobs) if delta.logprobs else None
        if self.chat:
            choice = ChatChunkChoice(0, ChatDelta(content=delta.text), delta.finish_reason, lp)
            body: Any = ChatCompletionChunk(self.gen.request_id, self.created, self.model, [choice])
        else:
            choice2 = CompletionChoice(0, delta.text, delta.finish_reason, lp)
            body = Completion(self.gen.request_id, self.created, self.model, [choice2])
        return _json.encode(body)

    def usage_chunk(self) -> bytes:
        if self.chat:
            body: Any = ChatCompletionChunk(self.gen.request_id, self.created, self.model, [], usage=self.usage())
        else:
            body = Completion(self.gen.request_id, self.created, self.model, [], usage=self.usage())
        return _json.encode(body)

    # -------------------------------------------------------------------- whole response

    def add(self, delta: Delta) -> None:
        self.text_parts.append(delta.text)
        if delta.logprobs:
            self.logprobs.extend(delta.logprobs)
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason

    def final(self) -> bytes:
        text = "".join(self.text_parts)
        lp = self._format_logprobs(self.logprobs) if self.logprobs else None
        if self.chat:
            choice = ChatChoice(0, ChatResponseMessage("assistant", text), self.finish_reason, lp)
            body: Any = ChatCompletion(self.gen.request_id, self.created, self.model, [choice], self.usage())
        else:
            choice2 = CompletionChoice(0, text, self.finish_reason, lp)
            body = Completion(self.gen.request_id, self.created, self.model, [choice2], usage=self.usage())
        return _json.encode(body)

    def _format_logprobs(self, items: list[TokenLogprob]) -> dict[str, Any]:
        tt = self.token_text
        if self.chat:
            content = [
                {
                    "token": tt(i.token_id),
                    "logprob": i.logprob,
                    "bytes": list(tt(i.token_id).encode()),
                    "top_logprobs": [
                        {"token": tt(t.token_id), "logprob": t.logprob, "bytes": list(tt(t.token_id).encode())}
                        for t in i.top
                    ],
                }
                for i in items
            ]
            return {"content": content}
        return {
            "tokens": [tt(i.token_id) for i in items],
            "token_logprobs": [i.logprob for i in items],
            "top_logprobs": [{tt(t.token_id): t.logprob for t in i.top} for i in items],
        }
