"""The length bound: exact for the packaged byte-level BPE, absent where a tokenizer cannot prove it."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

from lightspeed.frontend.token_bound import TokenBound


@pytest.fixture(scope="module")
def smollm(smollm_folder: Path) -> Tokenizer:
    return Tokenizer.from_file(str(smollm_folder / "tokenizer.json"))


def test_the_packaged_tokenizer_has_a_bound(smollm: Tokenizer) -> None:
    # Its longest token is "\n" + 80 spaces; six ASCII controls are missing and encode to nothing.
    assert TokenBound.of(smollm) == TokenBound(81, "\x04\x06\x13\x14\x16\x1d")
    assert smollm.encode("\x13" * 50, add_special_tokens=False).ids == []


def test_the_bound_holds_for_random_text(smollm: Tokenizer) -> None:
    bound = TokenBound.of(smollm)
    assert bound is not None
    alphabet = [chr(c) for c in range(0x250)] + ["你", "😀", chr(0x50000), "<|im_start|>", "\n" + " " * 80]
    rng = random.Random(0)
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 300)))
        assert len(smollm.encode(text, add_special_tokens=False).ids) >= bound.min_tokens(text), text


def test_min_tokens_rounds_up() -> None:
    bound = TokenBound(4, "\x00")
    assert [bound.min_tokens("a" * n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]
    assert bound.min_tokens("\x00" * 100 + "a") == 1


def test_proves_at_least_answers_only_what_reaches_the_limit() -> None:
    bound = TokenBound(4, "\x00")
    assert [bound.proves_at_least("a" * n, 3) for n in (8, 9, 12, 13)] == [None, 3, 3, 4]
    assert bound.proves_at_least("\x00" * 20 + "a" * 8, 3) is None  # long enough, but the scan says 2


def test_a_normalizer_or_a_dropping_pre_tokenizer_gives_no_bound(smollm: Tokenizer) -> None:
    normalized = Tokenizer.from_str(smollm.to_str())
    normalized.normalizer = normalizers.NFC()  # composes characters: text can shrink
    assert TokenBound.of(normalized) is None
    dropping = Tokenizer.from_str(smollm.to_str())
    dropping.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.ByteLevel()])
    assert TokenBound.of(dropping) is None  # Whitespace drops the spaces
    removed = Tokenizer.from_str(smollm.to_str())
    removed.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(" ", behavior="removed"), pre_tokenizers.ByteLevel()]
    )
    assert TokenBound.of(removed) is None
    kept = Tokenizer.from_str(smollm.to_str())
    kept.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(" ", behavior="isolated"), pre_tokenizers.ByteLevel()]
    )
    assert TokenBound.of(kept) == TokenBound.of(smollm)


def test_other_models_give_no_bound() -> None:
    wordpiece = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))  # a long word -> one [UNK]
    wordpiece.pre_tokenizer = pre_tokenizers.ByteLevel()
    assert TokenBound.of(wordpiece) is None
    no_byte_level = Tokenizer(models.BPE({"a": 0}, []))
    no_byte_level.pre_tokenizer = pre_tokenizers.Digits()
    assert TokenBound.of(no_byte_level) is None
    assert TokenBound.of(Tokenizer(models.BPE({"a": 0}, []))) is None  # no pre-tokenizer at all


def test_a_missing_continuation_byte_gives_no_bound() -> None:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    full = {c: i for i, c in enumerate(sorted(alphabet))}
    bpe = Tokenizer(models.BPE(dict(full), []))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    assert TokenBound.of(bpe) == TokenBound(1, "")
    # Bytes outside GPT-2's printable ranges map to chr(256 + n) in order: 0x00-0x20, then 0x7F, 0x80...
    without = {c: i for i, c in enumerate(sorted(alphabet)) if c != "\u0122"}  # byte 0x80
    gap = Tokenizer(models.BPE(without, []))
    gap.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    assert TokenBound.of(gap) is None


def test_a_missing_ascii_byte_is_a_silent_character() -> None:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    no_nul = Tokenizer(models.BPE({c: i for i, c in enumerate(sorted(alphabet)) if c != "\u0100"}, []))  # byte 0
    no_nul.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    assert TokenBound.of(no_nul) == TokenBound(1, "\x00")
