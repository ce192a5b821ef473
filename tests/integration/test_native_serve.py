"""`lightspeed serve` with the native engine: the real SmolLM2 model behind the OpenAI API."""

from __future__ import annotations

import openai
import pytest

from tests.integration.conftest import MODEL, Server

pytestmark = pytest.mark.native


@pytest.fixture(scope="module")
def native(native_server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=native_server.base_url, api_key="unused", max_retries=0, timeout=120)


def test_capital_of_france(native: openai.OpenAI) -> None:
    resp = native.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=40
    )
    assert "Paris" in resp.choices[0].message.content
    assert resp.choices[0].finish_reason == "stop"


def test_greedy_is_deterministic_and_prefix_cached(native: openai.OpenAI) -> None:
    system = "You are a geography teacher. " * 20  # > 2 KV blocks of 64 tokens
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Name a river in Egypt."}]
    first = native.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    second = native.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    assert first.choices[0].message.content == second.choices[0].message.content
    assert second.usage.prompt_tokens_details.cached_tokens >= 128


def test_streaming_matches_non_streaming(native: openai.OpenAI) -> None:
    kwargs = {"model": MODEL, "prompt": "The three primary colors are", "max_tokens": 16, "temperature": 0}
    whole = native.completions.create(**kwargs).choices[0].text
    streamed = "".join(c.choices[0].text for c in native.completions.create(**kwargs, stream=True))
    assert streamed == whole


def test_stop_string_with_real_model(native: openai.OpenAI) -> None:
    resp = native.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=40,
        stop=["Paris"],
    )
    assert "Paris" not in resp.choices[0].message.content
    assert resp.choices[0].finish_reason == "stop"


def test_logprobs(native: openai.OpenAI) -> None:
    resp = native.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hi"}], max_tokens=4, logprobs=True, top_logprobs=3
    )
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    assert all(len(c.top_logprobs) == 3 and c.logprob <= 0 for c in content)
