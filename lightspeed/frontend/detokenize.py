"""Token ids -> streamed text, with stop strings.

Two pieces, used together by `IncrementalDetokenizer`:

* windowed incremental decoding (vLLM's prefix/read offsets): each step decodes only the few
  tokens since the last emitted boundary, and holds text back while it ends in U+FFFD, i.e. while
  a multi-byte UTF-8 character is split across tokens. The concatenated stream equals a full
  `decode` of all ids, at O(window) cost per token instead of O(sequence).
* `StopMatcher`: finds stop strings across token boundaries. Text that could still become a
  stop string is held back (and released when it cannot), so the client never sees a partial
  stop string that is later retracted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

_REPLACEMENT = "\ufffd"
# Prompt tokens decoded as left context for the first outputs (as vLLM does): decoders that
# strip a leading space at the start of a sequence (SentencePiece "▁") then keep it mid-text.
_PROMPT_CONTEXT_TOKENS = 5


class TokenDecoder(Protocol):
    """What the detokenizer needs: `tokenizers.Tokenizer` and `Preprocessor` both fit."""

    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


@dataclass(frozen=True, slots=True)
class DetokDelta:
    text: str  # new text to send to the client (may be empty)
    stopped: bool = False  # a stop string matched: the request is finished


class StopMatcher:
    """Streams text through, truncating at the first stop string to complete."""

    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool = False) -> None:
        self._stops = [s for s in dict.fromkeys(stop) if s]  # dedupe, ignore empty strings
        self._include = include_stop_str_in_output
        self._max_hold = max((len(s) for s in self._stops), default=1) - 1
        self._held = ""
        self.matched: str | None = None

    def feed(self, text: str) -> DetokDelta:
        if self.matched is not None:
            return DetokDelta("", True)
        if not self._stops:
            return DetokDelta(text)
        buf = self._held + text
        hit = self._first_match(buf)
        if hit is not None:
            start, stop = hit
            self.matched, self._held = stop, ""
            end = start + len(stop) if self._include else start
            return DetokDelta(buf[:end], True)
        keep = self._hold_length(buf)
        self._held = buf[len(buf) - keep :]
        return DetokDelta(buf[: len(buf) - keep])

    def flush(self) -> str:
        """Release held-back text at the end of the stream (nothing can match any more)."""
        held, self._held = self._held, ""
        return held

    def _first_match(self, buf: str) -> tuple[int, str] | None:
        # The stop that *completes* first wins, as it would if text arrived one char at a time;
        # on a tie the longer (earlier-starting) one.
        best: tuple[int, int] | None = None
        found: tuple[int, str] | None = None
        for stop in self._stops:
            start = buf.find(stop)
            key = (start + len(stop), -len(stop))
            if start >= 0 and (best is None or key < best):
                best, found = key, (start, stop)
        return found

    def _hold_length(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of some stop string."""
        for k in range(min(len(buf), self._max_hold), 0, -1):
            tail = buf[-k:]
            if any(stop.startswith(tail) for stop in self._stops):
                return k
        return 0


class IncrementalDetokenizer:
    """Per-request streaming decoder: `add` new ids as they arrive, `flush` at the end."""

    def __init__(
        self,
        tokenizer: TokenDecoder,
        skip_special_tokens: bool = True,
        stop: Sequence[str] | None = None,
        include_stop_str_in_output: bool = False,
        prompt_token_ids: Sequence[int] | None = None,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._stop = StopMatcher(stop or [], include_stop_str_in_output)
        context = list(prompt_token_ids or [])[-_PROMPT_CONTEXT_TOKENS:]
        self._ids: list[int] = context
        self._prefix_offset = 0  # start of the decode window (left context)
        self._read_offset = len(context)  # ids before this were emitted
        self._prefix_text: str | None = None  # decode(ids[prefix:read]), cached per window
        self._pieces: list[str] = []

    @property
    def stopped(self) -> bool:
        return self._stop.matched is not None

    @property
    def stop_reason(self) -> str | None:
        """The stop string that ended the output, if one did."""
        return self._stop.matched

    @property
    def output_text(self) -> str:
        """All text emitted so far (deltas and flush), joined."""
        return "".join(self._pieces)

    def add(self, token_ids: Sequence[int]) -> DetokDelta:
        """Text that became final with these ids; `stopped` once a stop string matched."""
        if self.stopped:
            return DetokDelta("", True)
        parts: list[str] = []
        for token_id in token_ids:
            self._ids.append(token_id)
            step = self._stop.feed(self._decode_step())
            parts.append(step.text)
            if step.stopped:
                break
        return self._emit("".join(parts), self.stopped)

    def flush(self) -> str:
        """End of stream: release text held for an incomplete character or a possible stop."""
        if self.stopped:
            return ""
        tail = self._stop.feed(self._decode_rest())
        text = tail.text if tail.stopped else tail.text + self._stop.flush()
        return self._emit(text, tail.stopped).text

    def _emit(self, text: str, stopped: bool) -> DetokDelta:
        if text:
            self._pieces.append(text)
        return DetokDelta(text, stopped)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)

    def _window_prefix_text(self) -> str:
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        return self._prefix_text

    def _decode_step(self) -> str:
        """New final text after appending ids; advances the window only past complete chars."""
        prefix_text = self._window_prefix_text()
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT):
            return ""  # nothing new yet, or a character is still split across tokens
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._prefix_text = None
        return new_text[len(prefix_text) :]

    def _decode_rest(self) -> str:
        """Whatever is still unreleased, U+FFFD included (the ids truly end mid-character)."""
        if self._read_offset == len(self._ids):
            return ""
        prefix_text = self._window_prefix_text()
        new_text = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        self._prefix_text = None
        return new_text[len(prefix_text) :]
