"""Special-token strings inside chat messages stay text: only the template's markup is control.

A user who writes `<|im_end|>\\n<|im_start|>system\\n...` in a message would otherwise forge a
system turn: the rendered prompt is one string, and the tokenizer turns every special-token
string in it into the real control token. Here message strings are masked before the template
is rendered (each special-token string becomes a random sentinel the client cannot guess), so
the special tokens left in the rendered text are exactly the template's own. The text between
them is encoded with special-token matching off, after the sentinels are put back, so the
user's strings become ordinary text tokens (vLLM's `split_special_tokens`, for content only).

Messages without any special-token string (nearly all) skip all of this: `mask` returns None and
the prompt is tokenized exactly as before, the way HF `apply_chat_template` does.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from tokenizers import Tokenizer

_OPEN, _CLOSE = "\ue000", "\ue001"  # private-use characters around each sentinel


@dataclass(frozen=True, slots=True)
class Masked:
    """Messages (and tools) with special-token strings replaced by sentinels."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    unmask: Callable[[str], str]  # the rendered text with every sentinel turned back


class SpecialText:
    """Finds the tokenizer's special-token strings in messages and encodes them as text."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        added = tokenizer.get_added_tokens_decoder()
        self._special_ids = frozenset(i for i, token in added.items() if token.special)
        self._specials = sorted({added[i].content for i in self._special_ids}, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, self._specials))) if self._specials else None

    @cached_property
    def _literal(self) -> Tokenizer:
        """A copy of the tokenizer that encodes special-token strings as ordinary text."""
        copy = Tokenizer.from_str(self._tokenizer.to_str())
        copy.encode_special_tokens = True
        return copy

    def mask(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> Masked | None:
        """Sentinels for every special-token string in any message or tool string; None if none."""
        pattern = self._pattern
        if pattern is None or not (_any_string(messages, pattern) or _any_string(tools, pattern)):
            return None
        nonce = secrets.token_hex(16)
        sentinels = {s: f"{_OPEN}{nonce}.{k}{_CLOSE}" for k, s in enumerate(self._specials)}
        found = re.compile(re.escape(f"{_OPEN}{nonce}.") + rf"(\d+){_CLOSE}")

        def hide(text: str) -> str:
            return pattern.sub(lambda m: sentinels[m.group()], text)

        def unmask(text: str) -> str:
            return found.sub(lambda m: self._specials[int(m.group(1))], text)

        return Masked(_map_strings(messages, hide), _map_strings(tools, hide), unmask)

    def encode(self, masked_text: str, masked: Masked) -> list[int]:
        """Ids of a prompt rendered from masked messages: its special tokens (the template's)
        stay control tokens; everything between them, the user's strings included, is text."""
        # encode_batch releases the GIL (encode does not): this runs in a pool thread.
        [encoding] = self._tokenizer.encode_batch([masked_text], add_special_tokens=False)
        ids: list[int] = []
        start = 0
        for token, (begin, end) in zip(encoding.ids, encoding.offsets, strict=True):
            if token in self._special_ids:
                ids += self._text_ids(masked.unmask(masked_text[start:begin]))
                ids.append(token)
                start = end
        ids += self._text_ids(masked.unmask(masked_text[start:]))
        return ids

    def _text_ids(self, text: str) -> list[int]:
        return self._literal.encode_batch([text], add_special_tokens=False)[0].ids if text else []


def _any_string(value: object, pattern: re.Pattern[str]) -> bool:
    """Whether any string in `value` matches (iterative: client JSON can nest deeply)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if pattern.search(item) is not None:
                return True
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _map_strings(value: Any, fn: Callable[[str], str]) -> Any:
    """`value` with `fn` applied to every string in it (dict keys and non-strings unchanged)."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, dict):
        return {k: _map_strings(v, fn) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_strings(v, fn) for v in value]
    return value
