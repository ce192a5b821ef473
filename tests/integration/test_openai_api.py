"""The OpenAI API of `lightspeed serve` (mocker workers), driven by the official openai client."""

from __future__ import annotations

import random

import openai
import pytest

from tests.integration.conftest import MODEL, Server


@pytest.fixture
def client(mocker_server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=mocker_server.base_url, api_key="unused", max_retries=0)


def token_prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 49000) for _ in range(n)]


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL]


def test_chat_completion_non_streaming(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello there"}], max_tokens=7
    )
    assert resp.object == "chat.completion"
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 7
    assert resp.usage.prompt_tokens > 5
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 7


def test_chat_completion_streaming_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Count to ten"}],
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.id == chunks[0].id and c.object == "chat.completion.chunk" for c in chunks)


def test_completion_with_token_ids_reports_cached_tokens(client: openai.OpenAI) -> None:
    prompt = token_prompt(300, seed=7)  # 4 full blocks of 64
    headers = {}
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, extra_body={"ignore_eos": True})
    assert first.usage.prompt_tokens == 300
    # Pin the second request to the same worker so its prefix cache is hit.
    health = client._client.get(client.base_url.copy_with(path="/health")).json()
    for worker in health["workers"]:
        headers = {"x-worker-instance-id": worker["instance_id"]}
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, extra_headers=headers)
        again = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, extra_headers=headers)
        assert again.usage.prompt_tokens_details.cached_tokens == 256
        assert again.usage.completion_tokens == 4


def test_completion_streaming_text_prompt(client: openai.OpenAI) -> None:
    stream = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=5, stream=True)
    chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.object == "text_completion" for c in chunks)


def test_min_tokens_and_ignore_eos_pass_through(client: openai.OpenAI) -> None:
    resp = client.completions.create(
        model=MODEL, prompt=token_prompt(10, 1), max_tokens=20, extra_body={"min_tokens": 20, "ignore_eos": True}
    )
    assert resp.usage.completion_tokens == 20


def test_sampling_fields_accepted(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        temperature=0.7,
        top_p=0.9,
        seed=3,
        stop=["\n\n"],
        extra_body={"top_k": 20},
    )
    assert resp.usage.completion_tokens <= 3


def test_direct_routing_to_unknown_worker_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="x", max_tokens=2, extra_headers={"x-worker-instance-id": "nope"})
    assert "nope" in err.value.message


def test_metrics_exposes_frontend_and_worker_series(client: openai.OpenAI, mocker_server: Server) -> None:
    client.completions.create(model=MODEL, prompt="metrics please", max_tokens=3)
    text = mocker_server.metrics()
    for name in (
        "lightspeed_frontend_requests_total",
        "lightspeed_frontend_time_to_first_token_seconds_bucket",
        "lightspeed_frontend_inter_token_latency_seconds_bucket",
        "lightspeed_frontend_input_sequence_tokens_bucket",
        "lightspeed_frontend_inflight_requests",
        "lightspeed_worker_kv_total_blocks",
    ):
        assert name in text, name


def test_stop_string_truncates_the_stream(client: openai.OpenAI) -> None:
    """Seeded mocker output is reproducible, so a stop string taken from the middle of a first
    answer must cut the second answer exactly there, streamed and not."""
    prompt = token_prompt(20, seed=11)
    full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, seed=1234)
    text = full.choices[0].text
    assert full.choices[0].finish_reason == "length" and len(text) > 30
    stop = text[len(text) // 2 : len(text) // 2 + 4]
    expected = text[: text.index(stop)]
    cut = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, seed=1234, stop=[stop])
    assert cut.choices[0].text == expected
    assert cut.choices[0].finish_reason == "stop"
    chunks = list(
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, seed=1234, stop=stop, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_least_loaded_and_random_modes_serve(tmp_path) -> None:
    from tests.integration.conftest import MOCKER_ARGS, start_serve, stop_serve

    for mode in ("least-loaded", "random"):
        server = start_serve([*MOCKER_ARGS, "--router-mode", mode, "--speedup-ratio", "1000"], workers=2)
        try:
            c = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
            for _ in range(4):
                assert c.completions.create(model=MODEL, prompt="x", max_tokens=2).usage.completion_tokens == 2
        finally:
            assert stop_serve(server) == 0
