"""Server-sent-event parsing for OpenAI-style streams, kept minimal for the client hot path.

Only `data:` fields matter for the OpenAI API; comments, `event:`/`id:` lines and blank event
separators are skipped. Chunk JSON is decoded into Structs that declare just the fields the
client measures, so msgspec skips everything else without building Python objects for it.
"""

from __future__ import annotations

import msgspec

DONE = b"[DONE]"


class SseLineBuffer:
    """Splits a byte stream into `data:` payloads; a line may span several network reads."""

    __slots__ = ("_partial",)

    def __init__(self) -> None:
        self._partial = b""

    def feed(self, data: bytes) -> list[bytes]:
        """Return the payloads of every complete `data:` line in `data` (plus buffered bytes)."""
        if self._partial:
            data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        out: list[bytes] = []
        for line in lines:
            if line.startswith(b"data:"):
                payload = line[5:].strip()
                if payload:
                    out.append(payload)
        return out

    def flush(self) -> list[bytes]:
        """Payload of a final line that had no trailing newline (a server closing abruptly)."""
        rest, self._partial = self._partial, b""
        return self.feed(rest + b"\n") if rest else []


class PromptTokensDetails(msgspec.Struct):
    cached_tokens: int | None = None


class Usage(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    prompt_tokens_details: PromptTokensDetails | None = None


class Delta(msgspec.Struct):
    content: str | None = None


class Choice(msgspec.Struct):
    text: str | None = None
    delta: Delta | None = None  # chat completions stream deltas instead of text
    finish_reason: str | None = None


class StreamChunk(msgspec.Struct):
    choices: list[Choice] = []
    usage: Usage | None = None
    # Some servers report mid-stream failures in-band; kept raw since each shapes it its own way.
    error: msgspec.Raw = msgspec.Raw(b"")

    @property
    def error_text(self) -> str | None:
        raw = bytes(self.error)
        return None if raw in (b"", b"null") else raw.decode(errors="replace")


_chunk_decoder = msgspec.json.Decoder(StreamChunk)


def decode_chunk(payload: bytes) -> StreamChunk:
    """Decode one `data:` payload; raises msgspec.DecodeError on malformed JSON."""
    return _chunk_decoder.decode(payload)


def carries_token(chunk: StreamChunk) -> bool:
    """Whether a chunk delivers generated output (counts for TTFT/ITL).

    A per-token stream may carry empty text for a token that ends mid-UTF-8 character, so an
    empty text still counts unless it is the bare finish marker that closes the stream; a choice
    with no text at all (a chat role-only delta) does not.
    """
    for choice in chunk.choices:
        text = choice.text
        if text is None and choice.delta is not None:
            text = choice.delta.content
        if text or (text is not None and choice.finish_reason is None):
            return True
    return False
