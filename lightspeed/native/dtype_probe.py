"""Time the real model in each candidate dtype: one prefill-sized and one decode-sized step.

Used by `--dtype auto` where the CPU's flags cannot decide (AVX512-BF16 without AMX): whether
bf16 beats fp32 there depends on the matmul shapes, so the model itself is measured, at start,
on its own weights, in a few hundred milliseconds. Each step runs once untimed first (oneDNN
builds its primitives on the first call) and the best of PROBE_REPEATS timed runs counts.
"""

from __future__ import annotations

import time

import torch

from lightspeed.models.attention_metadata import build_attention_metadata
from lightspeed.models.llama import PagedLlama
from lightspeed.models.weights import ModelConfig, StateDict
from lightspeed.native.dtype_choice import StepTimes

PROBE_BLOCK = 16
PROBE_PREFILL_TOKENS = 64  # a short prompt: enough rows for the GEMMs to show their speed
PROBE_DECODE_SEQS = 16  # a decode step of a moderately busy worker
PROBE_CONTEXT = 64  # each decoding sequence's position
PROBE_REPEATS = 2


def _time_step(model: PagedLlama, caches: list[torch.Tensor], qlens: list[int], starts: list[int]) -> float:
    """Best wall time of PROBE_REPEATS runs of one step (after one untimed warm-up)."""
    blocks = -(-(max(starts) + max(qlens)) // PROBE_BLOCK)
    tables = [list(range(blocks))] * len(qlens)  # shared blocks: the writes overlap, harmlessly
    layout = model.cache_layout(caches[0].shape[1], PROBE_BLOCK)
    meta = build_attention_metadata(qlens, starts, tables, layout, model.device)
    ids = torch.randint(100, model.config.vocab_size, (sum(qlens),), generator=torch.Generator().manual_seed(0))
    last = torch.tensor([sum(qlens[: i + 1]) - 1 for i in range(len(qlens))], dtype=torch.int64)
    model.rotary.ensure(max(starts) + max(qlens))
    best = float("inf")
    for attempt in range(PROBE_REPEATS + 1):
        start = time.perf_counter()
        model(ids.to(model.device), meta, caches, last.to(model.device))
        if attempt:  # the first run builds oneDNN primitives and touches the pages
            best = min(best, time.perf_counter() - start)
    return best


@torch.inference_mode()
def probe_dtype(config: ModelConfig, state: StateDict, dtype: torch.dtype, device: torch.device) -> StepTimes:
    model = PagedLlama(config, state, dtype, device)
    blocks = -(-(PROBE_PREFILL_TOKENS + PROBE_CONTEXT) // PROBE_BLOCK)
    caches = model.allocate_kv_cache(blocks, PROBE_BLOCK)
    prefill = _time_step(model, caches, [PROBE_PREFILL_TOKENS], [0])
    decode = _time_step(model, caches, [1] * PROBE_DECODE_SEQS, [PROBE_CONTEXT] * PROBE_DECODE_SEQS)
    return StepTimes(prefill, decode)


def probe_dtypes(config: ModelConfig, state: StateDict, device: torch.device) -> dict[torch.dtype, StepTimes]:
    """fp32 and bf16 step times of this model on this machine."""
    return {dtype: probe_dtype(config, state, dtype, device) for dtype in (torch.float32, torch.bfloat16)}
