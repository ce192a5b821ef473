"""bench/fault_soak.py's own logic: the modelled capacity, the seeded-stream oracle (checked
against a real mocker engine, chunked prefill and a continuation included), the stream check,
and its flags. No fleet runs here (tests/integration/test_cluster_faults.py uses the oracle on
real processes)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from lightspeed.engine.config import EngineConfig
from lightspeed.engine.core import EngineCore
from lightspeed.mocker.executor import MockerExecutor
from lightspeed.models.registry import resolve_model
from lightspeed.protocol import PreprocessedRequest, SamplingOptions, StopConditions

BENCH = Path(__file__).resolve().parents[3] / "bench"


@pytest.fixture(scope="module")
def soak() -> Iterator[ModuleType]:
    sys.path.insert(0, str(BENCH))
    try:
        import fault_soak

        yield fault_soak
    finally:
        sys.path.remove(str(BENCH))


def test_capacity_is_the_mocker_model_at_a_full_batch(soak: ModuleType) -> None:
    """prefill(128) = 4.209989e-7*128^2 + 1.518344e-2*128 + 16.50142 = 18.4518 ms; usage =
    8 x 10 / 1024 = 0.078125, decode = -25.74 u^2 + 54.01 u + 5.74 = 9.8024 ms; at speedup 0.1
    a worker does 1 / (0.184518 + 32 x 0.098024 / 8) = 1.7343 req/s."""
    cap = soak.modelled_capacity(soak.Params())
    assert cap.prefill_ms == pytest.approx(184.518, abs=1e-3)
    assert cap.decode_ms == pytest.approx(98.024, abs=1e-3)
    assert cap.kv_usage_full_batch == 0.078125
    assert cap.per_worker_req_s == pytest.approx(1.7343, abs=1e-4)
    assert cap.fleet_req_s == pytest.approx(4 * 1.7343, abs=4e-4)
    assert cap.rate_req_s == pytest.approx(0.7 * cap.fleet_req_s)
    assert soak.modelled_capacity(soak.Params(rate=3.0)).rate_req_s == 3.0


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("workers", 1, "workers must be >= 2"),
        ("isl", 64, "isl must be > 64"),
        ("runs", "faults,chaos", "runs: a comma-separated list"),
        ("load_fraction", 0.0, "load_fraction must be in"),
        ("cut_at", 1.0, "cut_at in (0, 1)"),
        ("nats_restart_at", 0.0, "fractions of the duration"),
    ],
)
def test_params_refuse_bad_values(soak: ModuleType, field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        soak.Params(**{field: value})


async def engine_tokens(prompt: list[int], seed: int, n: int) -> list[int]:
    """A real mocker engine (small prefill chunks) serving one seeded request."""
    model = resolve_model(None)
    config = EngineConfig(
        block_size=16, num_gpu_blocks=256, max_num_batched_tokens=32, max_model_len=1024, vocab_size=model.vocab_size
    )
    executor = MockerExecutor(config, speedup_ratio=1e6, vocab_size=model.vocab_size,
                              avoid_token_ids=set(model.eos_token_ids))  # fmt: skip
    core = EngineCore(config, executor)
    task = asyncio.create_task(core.run())
    try:
        req = PreprocessedRequest("r", model.served_name, prompt, SamplingOptions(seed=seed),
                                  StopConditions(max_tokens=n, ignore_eos=True))  # fmt: skip
        return [t async for out in core.add_request(req) for t in out.new_token_ids]
    finally:
        core.stop()
        await task


async def test_seeded_tokens_are_the_engines_and_a_continuation_goes_on_from_them(soak: ModuleType) -> None:
    streams = soak.SeededStreams()
    prompt = soak.prompt_of(3, 100, 0)
    full = await engine_tokens(prompt, 77, 20)
    assert streams.token_ids(len(prompt), 77, 20) == full
    # What a migration sends: prompt + the tokens so far; the rest must follow on.
    assert await engine_tokens(prompt + full[:8], 77, 12) == full[8:]
    assert streams.text(len(prompt), 77, 20) == streams.tokenizer.decode(full)


def test_check_flags_a_duplicated_or_missing_token(soak: ModuleType) -> None:
    p = soak.Params(isl=100, osl=6)
    streams = soak.SeededStreams()
    ids = streams.token_ids(100, 5, 6)
    pieces = [streams.tokenizer.decode([t]) for t in ids]

    def outcome(chunks: list[str], tokens: int) -> object:
        return soak.Outcome(5, 0.0, 0.1, 1.0, 200, chunks, tokens, "length", "w1")

    good = outcome(pieces, 6)
    duplicated = outcome([*pieces[:3], pieces[2], *pieces[3:]], 7)
    missing = outcome(pieces[:2] + pieces[3:], 5)
    failed = soak.Outcome(5, 0.0, status=503, error="HTTP 503")
    bad = soak.check([good, duplicated, missing, failed], p, streams)
    assert [(m.completion_tokens, m.first_diff_char) for m in bad] == [
        (7, len("".join(pieces[:3]))),
        (5, len("".join(pieces[:2]))),
    ]


def test_prompts_share_a_prefix_per_group_and_are_deterministic(soak: ModuleType) -> None:
    a, b, c = (soak.prompt_of(i, 128, 0) for i in (0, 8, 1))
    assert a == soak.prompt_of(0, 128, 0) and len(a) == 128
    assert a[:64] == b[:64] and a[64:] != b[64:]
    assert a[:64] != c[:64]
