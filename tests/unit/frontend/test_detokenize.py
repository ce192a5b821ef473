"""Incremental detokenization and stop strings: exact streams, split characters, held-back text."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from lightspeed.frontend.detokenize import (
    DetokDelta,
    IncrementalDetokenizer,
    StopMatcher,
)

SPECIAL = 0


class ByteTokens:
    """A byte-level toy tokenizer: id -> raw bytes; id 0 is a special token "<|end|>"."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = [b"<|end|>"] + pieces
        self.calls: list[int] = []  # length of every decoded window

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self.calls.append(len(ids))
        raw = b"".join(self.pieces[i] for i in ids if not (skip_special_tokens and i == SPECIAL))
        return raw.decode("utf-8", errors="replace")


def _toy(*pieces: str | bytes) -> tuple[ByteTokens, list[int]]:
    """Toy tokenizer whose ids 1..n are the given pieces, and those ids in order."""
    raw = [p.encode() if isinstance(p, str) else p for p in pieces]
    return ByteTokens(raw), list(range(1, len(raw) + 1))


def _stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[DetokDelta]:
    return [detok.add([i]) for i in ids]


@pytest.fixture(scope="module")
def smol(smollm_folder: Path) -> Tokenizer:
    return Tokenizer.from_file(str(smollm_folder / "tokenizer.json"))


# ---------------------------------------------------------------- incremental decoding


def test_multibyte_characters_split_across_tokens() -> None:
    # "世" = e4 b8 96, "🎉" = f0 9f 8e 89: never emit a half character (U+FFFD).
    tok, ids = _toy("Hi ", b"\xe4", b"\xb8\x96", b" \xf0\x9f", b"\x8e", b"\x89!")
    detok = IncrementalDetokenizer(tok)
    assert [d.text for d in _stream(detok, ids)] == ["Hi ", "", "世", "", "", " 🎉!"]
    assert detok.flush() == ""
    assert detok.output_text == "Hi 世 🎉!"


def test_real_tokenizer_emoji_and_cjk_stream(smol: Tokenizer) -> None:
    text = "Hello 世界 🎉 done"
    ids = smol.encode(text).ids
    assert ids == [19556, 216, 7906, 240, 178, 239, 230, 15107, 232, 227, 2294]
    detok = IncrementalDetokenizer(smol)
    assert [d.text for d in _stream(detok, ids)] == ["Hello", " ", "", "世", "", "", "界", "", "", " 🎉", " done"]
    assert detok.flush() == ""
    assert detok.output_text == text


def test_incomplete_tail_is_released_by_flush() -> None:
    tok, ids = _toy("ok", b"\xe4\xb8")  # the stream ends mid-character
    detok = IncrementalDetokenizer(tok)
    assert [d.text for d in _stream(detok, ids)] == ["ok", ""]
    assert detok.flush() == "\ufffd"  # exactly what a full decode shows
    assert detok.output_text == tok.decode(ids)


def test_special_tokens_skipped_or_kept() -> None:
    tok, _ids = _toy("a", "b")
    skip = IncrementalDetokenizer(tok)
    assert [d.text for d in _stream(skip, [1, SPECIAL, 2])] == ["a", "", "b"]
    keep = IncrementalDetokenizer(tok, skip_special_tokens=False)
    assert [d.text for d in _stream(keep, [1, SPECIAL, 2])] == ["a", "<|end|>", "b"]


def test_batched_add_equals_single_adds() -> None:
    tok, ids = _toy("a", b"\xe4", b"\xb8\x96", "b")
    detok = IncrementalDetokenizer(tok)
    assert detok.add(ids[:2]) == DetokDelta("a", False)
    assert detok.add(ids[2:]) == DetokDelta("世b", False)


def test_decode_window_stays_small() -> None:
    tok, ids = _toy(*[f" w{i}" for i in range(2000)])
    detok = IncrementalDetokenizer(tok)
    for i in ids:
        detok.add([i])
    assert max(tok.calls) == 2  # each step decodes at most the previous token + the new one
    assert len(tok.calls) == 2 * len(ids)
    assert detok.output_text == "".join(f" w{i}" for i in range(2000))


def test_prompt_context_keeps_leading_space() -> None:
    class StripsFirstSpace(ByteTokens):
        """Like SentencePiece decoders: a sequence's first token loses its leading space."""

        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            text = super().decode(ids, skip_special_tokens)
            return text[1:] if text.startswith(" ") else text

    tok = StripsFirstSpace([b" Hello", b" world"])
    assert IncrementalDetokenizer(tok).add([2]).text == "world"
    assert IncrementalDetokenizer(tok, prompt_token_ids=[1]).add([2]).text == " world"


@pytest.mark.parametrize("seed", range(5))
def test_random_ids_match_full_decode(smol: Tokenizer, seed: int) -> None:
    rng = random.Random(seed)
    vocab = smol.get_vocab_size()
    for _ in range(40):
        ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 30))]
        detok = IncrementalDetokenizer(smol)
        pos, text = 0, ""
        while pos < len(ids):
            step = rng.randint(1, 3)
            text += detok.add(ids[pos : pos + step]).text
            pos += step
        text += detok.flush()
        assert text == smol.decode(ids)


def test_printable_random_text_round_trips(smol: Tokenizer) -> None:
    rng = random.Random(7)
    alphabet = "abcXYZ 0123\n\t.,;'\"(){}<>é世界🎉ß"
    for _ in range(50):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60)))
        ids = smol.encode(text).ids
        detok = IncrementalDetokenizer(smol)
        streamed = "".join(d.text for d in _stream(detok, ids)) + detok.flush()
        assert streamed == text


# ---------------------------------------------------------------- stop strings


def test_stop_split_across_tokens() -> None:
    tok, ids = _toy("Hel", "lo", " wor", "ld")
    detok = IncrementalDetokenizer(tok, stop=["lo w"])
    # "l" could start "lo w": held; "lo" still could; " wor" completes the match.
    assert _stream(detok, ids[:3]) == [DetokDelta("He"), DetokDelta("l"), DetokDelta("", True)]
    assert detok.add(ids[3:]) == DetokDelta("", True)  # later tokens are ignored
    assert detok.flush() == ""
    assert (detok.output_text, detok.stop_reason, detok.stopped) == ("Hel", "lo w", True)


def test_held_text_released_when_match_fails() -> None:
    tok, ids = _toy("Hello", " wor", "ld", ".")
    detok = IncrementalDetokenizer(tok, stop=["world!"])
    assert [d.text for d in _stream(detok, ids)] == ["Hello", " ", "", "world."]
    assert not detok.stopped


def test_held_text_released_on_flush() -> None:
    tok, ids = _toy("Hello", " wor")
    detok = IncrementalDetokenizer(tok, stop=["world"])
    assert [d.text for d in _stream(detok, ids)] == ["Hello", " "]
    assert detok.flush() == "wor"
    assert detok.output_text == "Hello wor"


def test_stop_at_very_first_token() -> None:
    tok, ids = _toy("STOP", "more")
    detok = IncrementalDetokenizer(tok, stop=["STOP"])
    assert detok.add(ids) == DetokDelta("", True)
    assert detok.output_text == ""
    kept = IncrementalDetokenizer(tok, stop=["STOP"], include_stop_str_in_output=True)
    assert kept.add(ids) == DetokDelta("STOP", True)


def test_include_stop_string_across_tokens() -> None:
    tok, ids = _toy("a</", "s>b")
    detok = IncrementalDetokenizer(tok, stop=["</s>"], include_stop_str_in_output=True)
    assert _stream(detok, ids) == [DetokDelta("a"), DetokDelta("</s>", True)]


def test_stop_inside_a_token_truncates_it() -> None:
    tok, ids = _toy("one. two. three")
    assert IncrementalDetokenizer(tok, stop=["."]).add(ids) == DetokDelta("one", True)


def test_first_completed_stop_wins() -> None:
    tok, ids = _toy("xabcd")
    detok = IncrementalDetokenizer(tok, stop=["abcd", "bc"])
    assert detok.add(ids) == DetokDelta("xa", True)
    assert detok.stop_reason == "bc"


def test_stop_on_a_split_multibyte_character() -> None:
    tok, ids = _toy("A", b"\xe4\xb8", b"\x96B")
    detok = IncrementalDetokenizer(tok, stop=["世"])
    assert _stream(detok, ids) == [DetokDelta("A"), DetokDelta(""), DetokDelta("", True)]


def test_stop_matched_in_flushed_tail() -> None:
    tok, ids = _toy("ab", b"\xe4")
    detok = IncrementalDetokenizer(tok, stop=["b\ufffd"])
    assert [d.text for d in _stream(detok, ids)] == ["a", ""]
    assert detok.flush() == ""
    assert detok.stopped


def test_stop_on_special_token_text_when_not_skipped() -> None:
    tok, ids = _toy("done")
    detok = IncrementalDetokenizer(tok, skip_special_tokens=False, stop=["<|end|>"])
    assert _stream(detok, [ids[0], SPECIAL]) == [DetokDelta("done"), DetokDelta("", True)]


def test_real_tokenizer_stop_across_tokens(smol: Tokenizer) -> None:
    ids = smol.encode("The answer is 42. Next question").ids
    detok = IncrementalDetokenizer(smol, stop=["42."])
    text = "".join(d.text for d in _stream(detok, ids))
    assert (text, detok.stopped) == ("The answer is ", True)


def test_stop_matcher_ignores_empty_and_duplicate_stops() -> None:
    matcher = StopMatcher(["", "x", "x"])
    assert matcher.feed("abc") == DetokDelta("abc")
    assert matcher.feed("axb") == DetokDelta("a", True)
    assert StopMatcher([]).feed("anything") == DetokDelta("anything")
