from __future__ import annotations

import random
from collections import Counter

import pytest

from lightspeed.protocol import DEFAULT_PERF_MODEL, PerfModel
from lightspeed.router.cost import (
    Candidate,
    KvCostConfig,
    block_cost,
    choose,
    latency_cost,
    softmax_weights,
)

PERF = PerfModel((0.0, 0.01, 10.0), (0.0, 0.0, 2.0), 1.0, 1.0)  # prefill 10 ms + 10 µs/token, decode 2 ms


def cand(
    worker: str = "w",
    overlap: int = 0,
    new: int = 0,
    active: int = 0,
    decode: int = 0,
    total: int = 1000,
    chunk: int = 1000,
    perf: PerfModel | None = PERF,
    elapsed: float = 0.0,
    prefilling: int = 0,
    decoding: int = 0,
) -> Candidate:
    return Candidate(worker, overlap, new, active, decode, total, chunk, 16, perf, elapsed, prefilling, decoding)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="overlap_score_weight"):
        KvCostConfig(overlap_score_weight=-1)
    with pytest.raises(ValueError, match="temperature"):
        KvCostConfig(temperature=-0.1)
    with pytest.raises(ValueError, match="policy"):
        KvCostConfig(policy="magic")


def test_block_cost_is_dynamo_formula() -> None:
    # prefill (32 active + 64 new) / 16 = 6 blocks, weighted 2.0 -> 12, plus 5 decode blocks
    assert block_cost(cand(new=64, active=32, decode=5), 2.0) == 17.0
    assert block_cost(cand(new=64, active=32, decode=5), 0.0) == 5.0


def test_latency_cost_chunks_the_queued_work() -> None:
    # An idle worker (nothing decodes): 2500 tokens at chunk 1000 = 2 full chunks (10+10 ms each)
    # + 500 (10+5 ms), no decode phase at all (the first token leaves when a prefill phase ends).
    assert latency_cost(cand(new=1500, active=1000), PERF) == pytest.approx(55.0 / 1000)


def test_latency_cost_pays_a_decode_phase_between_steps_when_something_decodes() -> None:
    # A request ahead still prefilling: its first token makes the worker decode, so each of the
    # 3 steps but the last (which ends with this request's first token) pays 2 ms of decode.
    assert latency_cost(cand(new=1500, active=1000, prefilling=1), PERF) == pytest.approx(59.0 / 1000)


def test_latency_cost_decode_tokens_share_the_step_budget() -> None:
    # 200 decoding requests take 200 tokens of each step: chunks of 800. 2500 tokens = 3 full
    # chunks (10+8 ms each) + 100 (10+1 ms) = 65 ms, plus 3 decode phases of 2 ms = 71 ms.
    assert latency_cost(cand(new=1500, active=1000, decoding=200), PERF) == pytest.approx(71.0 / 1000)


def test_latency_cost_counts_queued_prefill_done_since_the_last_progress() -> None:
    # 3000 queued tokens, 50 ms since the worker last showed progress; a full step is 20 + 2 ms,
    # so int(50 / 22 * 1000) = 2272 tokens are probably done: 728 left + 500 new = 1228 tokens
    # = one full chunk (20 ms) + 228 (10 + 2.28 ms) + one decode phase (2 ms) = 34.28 ms.
    c = cand(new=500, active=3000, elapsed=0.05, prefilling=2)
    assert latency_cost(c, PERF) == pytest.approx(34.28 / 1000)
    # Never the whole queue: its first token has not come back, so one token stays queued:
    # 501 tokens in one step, 10 + 5.01 ms, no decode phase before it.
    assert latency_cost(cand(new=500, active=3000, elapsed=10.0, prefilling=2), PERF) == pytest.approx(15.01 / 1000)
    # A 4x faster worker (speedup 4) gets through 4x the tokens in the same wall time:
    # int(50 * 4 / 22 * 1000) = 9090 -> capped at 2999 -> 501 tokens: 15.01 / 4 ms.
    fast = PerfModel(PERF.prefill_coeffs, PERF.decode_coeffs, 1.0, 4.0)
    assert latency_cost(cand(new=500, active=3000, elapsed=0.05, prefilling=2, perf=fast), PERF) == (
        pytest.approx(15.01 / 4 / 1000)
    )


def test_latency_cost_penalises_kv_overflow_and_uses_speedup() -> None:
    fits = latency_cost(cand(new=100, decode=1000, total=1000), PERF)
    overflows = latency_cost(cand(new=100, decode=1010, total=1000), PERF)
    assert overflows - fits == pytest.approx(10 * 16 * 0.01 / 1000)  # 10 blocks recomputed
    fast = PerfModel(PERF.prefill_coeffs, PERF.decode_coeffs, 1.0, 4.0)
    assert latency_cost(cand(new=100, perf=fast), PERF) == pytest.approx(latency_cost(cand(new=100), PERF) / 4)


def test_latency_cost_falls_back_to_default_perf() -> None:
    assert latency_cost(cand(new=100, perf=None), PERF) == latency_cost(cand(new=100), PERF)
    # Without one given, the default is Dynamo's model: one step of 1000 tokens, no decode.
    assert latency_cost(cand(new=1000, perf=None)) == pytest.approx(32.1058589 / 1000)
    assert latency_cost(cand(new=1000, perf=None)) == latency_cost(cand(new=1000, perf=DEFAULT_PERF_MODEL))


def test_choose_argmin_and_random_tie_break() -> None:
    rng = random.Random(0)
    assert choose([("a", 3.0), ("b", 1.0), ("c", 2.0)], 0.0, rng) == "b"
    picks = Counter(choose([("a", 1.0), ("b", 1.0), ("c", 5.0)], 0.0, rng) for _ in range(400))
    assert set(picks) == {"a", "b"} and min(picks.values()) > 150
    with pytest.raises(ValueError):
        choose([], 0.0, rng)


def test_softmax_weights_and_sampling_distribution() -> None:
    weights = softmax_weights([0.0, 10.0], 1.0)  # normalised costs 0 and 1 -> e^0 : e^-1
    assert weights[0] == pytest.approx(1 / (1 + 2.718281828459045**-1))
    assert softmax_weights([3.0, 3.0, 3.0], 0.5) == [1 / 3, 1 / 3, 1 / 3]
    rng = random.Random(1)
    n = 20000
    picks = Counter(choose([("lo", 0.0), ("hi", 10.0)], 1.0, rng) for _ in range(n))
    assert picks["lo"] / n == pytest.approx(weights[0], abs=0.015)
    # a high temperature flattens the distribution towards uniform
    hot = softmax_weights([0.0, 10.0], 100.0)
    assert hot[0] == pytest.approx(0.5, abs=0.01)
