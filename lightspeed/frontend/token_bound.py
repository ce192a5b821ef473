"""A lower bound on how many tokens a text becomes, from its length alone.

A prompt whose length already proves it cannot fit the model's context is refused before it is
tokenized: tokenizing megabytes takes seconds of CPU that an answer of "too long" does not need.

The bound holds only where it can be proved from the tokenizer's shape: a byte-level BPE model
(every UTF-8 byte of the text ends up in exactly one token, so tokens >= bytes / longest token)
with no normalizer (which could shrink the text) and pre-tokenizers that only split (none that
drop characters). Vocabularies that lack a few ASCII control bytes drop those characters
silently, so they are not counted; missing lead bytes do not matter, as long as every UTF-8
continuation byte encodes (a non-ASCII character always has one). Any other tokenizer gets no bound (None): its prompts are
tokenized, still off the event loop and bounded by the tokenizer pool.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from tokenizers import Tokenizer, pre_tokenizers

# Pre-tokenizers that split text without dropping any of it (when their behavior keeps pieces).
_SPLITTING = frozenset({"ByteLevel", "Digits", "Split", "Punctuation"})
# The bytes a byte-level alphabet maps to characters, as `tokenizers` does (GPT-2's table).
_PRINTABLE = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]


@dataclass(frozen=True, slots=True)
class TokenBound:
    max_token_bytes: int  # the longest token, in bytes of text
    silent_chars: str = ""  # ASCII characters missing from the vocabulary: they may yield no token

    def min_tokens(self, text: str) -> int:
        """At least this many tokens: every counted character is at least one byte of a token."""
        counted = len(text) - sum(text.count(c) for c in self.silent_chars)
        return -(-counted // self.max_token_bytes)

    def proves_at_least(self, text: str, limit: int) -> int | None:
        """`min_tokens(text)` when it reaches `limit`, else None. A text too short to reach it
        is answered from its length alone, without scanning it (the scan costs ~2 ms a MB)."""
        if len(text) <= (limit - 1) * self.max_token_bytes:
            return None
        count = self.min_tokens(text)
        return count if count >= limit else None

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> TokenBound | None:
        """The bound for `tokenizer`, or None when its shape does not prove one."""
        if type(tokenizer.model).__name__ != "BPE" or tokenizer.normalizer is not None:
            return None
        if not _only_splits_byte_level(tokenizer.pre_tokenizer):
            return None
        vocab = tokenizer.get_vocab(with_added_tokens=False)
        missing = [byte for byte, char in _byte_chars().items() if char not in vocab]
        if any(0x80 <= byte <= 0xBF for byte in missing):
            return None  # every non-ASCII character has a continuation byte: they must all encode
        longest = max((len(token) for token in vocab), default=1)  # one character per byte
        added = tokenizer.get_added_tokens_decoder().values()
        longest = max([longest, *(len(token.content.encode()) for token in added)])
        silent = "".join(chr(byte) for byte in sorted(missing) if byte < 0x80)
        return cls(max(longest, 1), silent)


def _only_splits_byte_level(pre: pre_tokenizers.PreTokenizer | None) -> bool:
    if pre is None:
        return False
    state = json.loads(pre.__getstate__())
    steps = state.get("pretokenizers", [state]) if state.get("type") == "Sequence" else [state]
    kinds = {step.get("type") for step in steps}
    keeps = all(step.get("behavior", "Isolated") != "Removed" for step in steps)
    return "ByteLevel" in kinds and kinds <= _SPLITTING and keeps


def _byte_chars() -> dict[int, str]:
    """Byte -> the character standing for it in a byte-level vocabulary."""
    chars = {byte: chr(byte) for byte in _PRINTABLE}
    extra = 0
    for byte in range(256):
        if byte not in chars:
            chars[byte] = chr(256 + extra)
            extra += 1
    return chars
