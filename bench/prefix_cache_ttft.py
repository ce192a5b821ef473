"""Prefix caching on the native engine: TTFT of a 2,000-token prompt, cold vs 1,900 tokens cached.

Starts `lightspeed serve --engine native` (1 worker) and, one request at a time, for each
repetition draws a fresh random 1,900-token prefix P and two 100-token tails A and B:
  cold   = TTFT of P + A (P was never seen: the whole prompt is computed),
  cached = TTFT of P + B right after (P's full blocks are in the prefix cache; only the rest is
           computed).
Each request asks for 1 token, streamed (TTFT = time to the first token chunk), with the same
load client as the other benchmarks. Writes bench/results/prefix_cache_ttft.json with every
sample, the means/medians, the cached-token counts the server reported, and cached/cold.

Run from the repo root:
    flock /tmp/lightspeed-bench.lock .venv/bin/python bench/prefix_cache_ttft.py
"""

from __future__ import annotations

import argparse
import logging
import random
import shlex
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import msgspec
from harness import (
    RESULTS,
    WORK,
    Script,
    Service,
    main,
    native_service,
    wait_model_ready,
    with_service,
)

from lightspeed.bench.client import (
    OpenAIClient,
    RequestResult,
    completions_url,
    make_session,
)
from lightspeed.bench.workload import RequestSpec

logger = logging.getLogger("prefix_cache_ttft")

TARGET_RATIO = 0.2  # cached TTFT <= 1/5 of cold


@dataclass(frozen=True, slots=True)
class Params:
    prompt_len: int = 2000
    prefix_len: int = 1900
    repetitions: int = 8
    warmup: int = 2  # untimed cold+cached pairs first (one-time costs of a fresh server)
    dtype: str = "bfloat16"
    block_size: int = 64
    max_num_batched_tokens: int = 8192  # the serve default: a 2,000-token prompt is one step
    min_token_id: int = 100
    vocab_size: int = 49152
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.prefix_len < self.prompt_len:
            raise ValueError("need 0 < prefix_len < prompt_len")
        if self.repetitions < 1 or self.warmup < 0:
            raise ValueError("repetitions must be >= 1 and warmup >= 0")


class Sample(msgspec.Struct):
    repetition: int
    cold_ttft_ms: float
    cached_ttft_ms: float
    cold_cached_tokens: int | None  # what the server reported as served from cache
    cached_cached_tokens: int | None


class Summary(msgspec.Struct):
    cold_mean_ms: float
    cold_p50_ms: float
    cached_mean_ms: float
    cached_p50_ms: float
    ratio_mean: float  # cached / cold
    ratio_p50: float
    target_ratio: float
    target_met: bool


class Report(msgspec.Struct):
    params: Params
    server_command: str
    samples: list[Sample]
    summary: Summary
    note: str


def _tokens(rng: random.Random, n: int, p: Params) -> tuple[int, ...]:
    return tuple(rng.randrange(p.min_token_id, p.vocab_size) for _ in range(n))


async def _ttft(client: OpenAIClient, prompt: tuple[int, ...]) -> RequestResult:
    result = await client.send(RequestSpec(prompt, max_tokens=1))
    if not result.ok or result.ttft_s is None:
        raise RuntimeError(f"request failed: {result.error} {result.error_detail}")
    return result


async def one_pair(client: OpenAIClient, rng: random.Random, p: Params, rep: int) -> Sample:
    """Cold P+A, then P+B with P cached."""
    prefix = _tokens(rng, p.prefix_len, p)
    tail_len = p.prompt_len - p.prefix_len
    cold = await _ttft(client, prefix + _tokens(rng, tail_len, p))
    cached = await _ttft(client, prefix + _tokens(rng, tail_len, p))
    sample = Sample(
        rep,
        cold.ttft_s * 1e3,
        cached.ttft_s * 1e3,  # type: ignore[operator]
        cold.cached_tokens,
        cached.cached_tokens,
    )
    logger.info(
        "rep %d: cold %.1f ms, cached %.1f ms (cached tokens %s -> %s)",
        rep,
        sample.cold_ttft_ms,
        sample.cached_ttft_ms,
        sample.cold_cached_tokens,
        sample.cached_cached_tokens,
    )
    return sample


async def measure(url: str, model: str, p: Params) -> list[Sample]:
    rng = random.Random(p.seed)
    async with make_session(1, 300.0) as session:
        client = OpenAIClient(session, completions_url(url), model)
        client.t0 = time.perf_counter()
        for i in range(p.warmup):
            await one_pair(client, rng, p, -1 - i)
        return [await one_pair(client, rng, p, rep) for rep in range(p.repetitions)]


def summarize(samples: list[Sample]) -> Summary:
    cold = [s.cold_ttft_ms for s in samples]
    cached = [s.cached_ttft_ms for s in samples]
    ratio_mean = statistics.mean(cached) / statistics.mean(cold)
    ratio_p50 = statistics.median(cached) / statistics.median(cold)
    return Summary(
        statistics.mean(cold),
        statistics.median(cold),
        statistics.mean(cached),
        statistics.median(cached),
        ratio_mean,
        ratio_p50,
        TARGET_RATIO,
        ratio_mean <= TARGET_RATIO,
    )


NOTE = (
    "Sequential requests on an otherwise idle server, max_tokens=1, streamed; TTFT measured by "
    "the client (HTTP + frontend + router + worker + one forward pass). Prefix cache blocks are "
    "64 tokens, so of the 1,900-token prefix the first 29 blocks (1,856 tokens) are reusable "
    "and the cached request computes the last 144 tokens."
)


async def run(args: argparse.Namespace, p: Params) -> Report:
    with tempfile.TemporaryDirectory(prefix="ls-prefix-") as tmp:
        extra = ["--block-size", str(p.block_size)]
        svc = native_service(
            "lightspeed-prefix",
            p.dtype,
            WORK / "prefix-cache-logs",
            Path(tmp),
            extra=extra,
            max_batched=p.max_num_batched_tokens,
        )
        models: list[str] = []

        async def ready(service: Service) -> None:
            models.append(await wait_model_ready(service))

        samples = await with_service(svc, ready, lambda url: measure(url, models[0], p))
    return Report(
        p,
        shlex.join(svc.commands[0]),
        samples,
        summarize(samples),
        NOTE,
    )


def result_path(args: argparse.Namespace) -> Path:
    return RESULTS / "prefix_cache_ttft.json"


def log_summary(report: Report) -> None:
    s = report.summary
    logger.info(
        "cold TTFT mean %.1f ms (p50 %.1f), cached mean %.1f ms (p50 %.1f): "
        "cached/cold %.3f (p50 %.3f), target <= %.2f met: %s",
        s.cold_mean_ms,
        s.cold_p50_ms,
        s.cached_mean_ms,
        s.cached_p50_ms,
        s.ratio_mean,
        s.ratio_p50,
        s.target_ratio,
        s.target_met,
    )


SCRIPT = Script(
    name="prefix_cache_ttft",
    doc=__doc__,
    params=Params,
    run=run,
    result_path=result_path,
    summarize=log_summary,
)


if __name__ == "__main__":
    raise SystemExit(main(SCRIPT))
