"""Every sampling and stop field reaches the native engine, end to end through `lightspeed serve`.

Each test compares two requests that differ in one field: if the field were dropped anywhere
between the HTTP body and the sampler (validation, preprocessing, the wire, the engine), the two
would come back identical, or the documented effect would be missing. Generations are 8 tokens or
fewer: the real model runs at a few dozen tokens per second on this machine.
"""

from __future__ import annotations

from typing import Any

import openai
import pytest
from openai.types import Completion
from tokenizers import Tokenizer

from lightspeed.models.registry import resolve_model
from tests.integration.conftest import MODEL, Server

pytestmark = pytest.mark.native

PROMPT = "The three primary colors are"
# The model answers this with EOS at once (greedy): a prompt where min_tokens / ignore_eos show.
STOPS_AT_ONCE = "What is 2+2? Answer:"
N = 8


@pytest.fixture(scope="module")
def client(native_server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=native_server.base_url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    """The served model's tokenizer (the folder `serve` already materialized), to name token ids."""
    return Tokenizer.from_file(str(resolve_model(None).folder / "tokenizer.json"))


class Sampler:
    """Completions of PROMPT, memoized: tests that need the same reference share one request."""

    def __init__(self, client: openai.OpenAI) -> None:
        self._client = client
        self._done: dict[str, Completion] = {}

    def __call__(self, prompt: str = PROMPT, max_tokens: int = N, **fields: Any) -> Completion:
        key = repr((prompt, max_tokens, sorted(fields.items())))
        if key not in self._done:
            self._done[key] = self.fresh(prompt, max_tokens, **fields)
        return self._done[key]

    def fresh(self, prompt: str = PROMPT, max_tokens: int = N, **fields: Any) -> Completion:
        """Always a new request (to show that a repeat gives the same answer)."""
        extra = {k: fields.pop(k) for k in ("top_k", "min_tokens", "ignore_eos", "stop_token_ids") if k in fields}
        return self._client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=max_tokens, extra_body=extra, **fields
        )


@pytest.fixture(scope="module")
def complete(client: openai.OpenAI) -> Sampler:
    return Sampler(client)


def text(resp: Completion) -> str:
    return resp.choices[0].text


def greedy(complete: Sampler) -> Completion:
    return complete(temperature=0, logprobs=2)


def seeded(complete: Sampler, seed: int, **fields: Any) -> Completion:
    return complete(temperature=1.0, seed=seed, **fields)


def test_greedy_obeys_max_tokens_and_returns_the_logprobs_of_its_tokens(complete: Sampler) -> None:
    resp = greedy(complete)
    choice = resp.choices[0]
    assert choice.finish_reason == "length" and resp.usage is not None and resp.usage.completion_tokens == N
    lp = choice.logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None and lp.top_logprobs is not None
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == N
    assert "".join(lp.tokens) == choice.text
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        # Greedy takes the most likely token, so it heads its own top-2 list.
        assert len(top) == 2 and top[token] == logprob == max(top.values()) and logprob <= 0


def test_the_same_seed_repeats_exactly_and_differs_from_greedy(complete: Sampler) -> None:
    first = seeded(complete, 1)
    again = complete.fresh(temperature=1.0, seed=1)
    assert text(again) == text(first)
    assert text(first) != text(greedy(complete))  # temperature 1.0 really samples


def test_different_seeds_differ(complete: Sampler) -> None:
    assert text(seeded(complete, 2)) != text(seeded(complete, 1))


def test_top_k_and_top_p_truncate_the_distribution(complete: Sampler) -> None:
    # top_k=1 (or a nucleus that holds only the top token) leaves one candidate: greedy.
    assert text(seeded(complete, 1, top_k=1)) == text(greedy(complete))
    assert text(seeded(complete, 1, top_p=1e-6)) == text(greedy(complete))
    # top_k as large as the vocabulary truncates nothing: the plain seeded draw, so the two
    # top_k values give different outputs from the same seed.
    assert text(seeded(complete, 1, top_k=49152)) == text(seeded(complete, 1)) != text(greedy(complete))


def test_stop_token_ids_end_the_generation_at_that_token(complete: Sampler, tokenizer: Tokenizer) -> None:
    reference = greedy(complete)
    ids = tokenizer.encode(text(reference), add_special_tokens=False).ids
    assert reference.choices[0].logprobs is not None
    assert [tokenizer.decode([i]) for i in ids] == reference.choices[0].logprobs.tokens  # same ids it generated
    stop_id = ids[2]
    resp = complete(temperature=0, stop_token_ids=[stop_id])
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None and resp.usage.completion_tokens == ids.index(stop_id) + 1
    # The stop token is an ordinary token here (not special), so its text is part of the output.
    assert text(resp) == tokenizer.decode(ids[: ids.index(stop_id) + 1])


def test_a_stop_string_truncates_the_text(complete: Sampler) -> None:
    whole = text(greedy(complete))
    word = whole.split()[3]  # a word from the middle of the greedy answer
    resp = complete(temperature=0, stop=[" " + word])
    assert resp.choices[0].finish_reason == "stop"
    assert text(resp) == whole[: whole.index(" " + word)]


def test_ignore_eos_and_min_tokens_keep_generating_past_eos(complete: Sampler) -> None:
    plain = complete(STOPS_AT_ONCE, max_tokens=6, temperature=0)
    assert plain.choices[0].finish_reason == "stop"
    assert plain.usage is not None and plain.usage.completion_tokens == 1, "the prompt must end at once at EOS"
    ignoring = complete(STOPS_AT_ONCE, max_tokens=6, temperature=0, ignore_eos=True)
    assert ignoring.choices[0].finish_reason == "length"
    assert ignoring.usage is not None and ignoring.usage.completion_tokens == 6
    at_least = complete(STOPS_AT_ONCE, max_tokens=6, temperature=0, min_tokens=4)
    assert at_least.usage is not None and 4 <= at_least.usage.completion_tokens <= 6
    assert text(at_least) != ""  # EOS was banned for the first 4 tokens, so real text came first
