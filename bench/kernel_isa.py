"""Micro-timing of the CPU kernels per SIMD path (LIGHTSPEED_KERNEL_ISA): not a test.

For each ISA this CPU runs (avx512, avx2, scalar), the kernel library is built with that ISA's
flags (avx2 on an AVX-512 CPU = -mno-avx512f: an AVX2-only CPU emulated on this one) and each
kernel is timed on a decode-like shape of SmolLM2-135M (9 query / 3 KV heads, hidden 576, FFN
1536): paged attention over `--seqs` sequences of `--context` tokens and of 32 tokens, head_dim 64
and 80 (80: no compile-time specialisation, the generic AVX2 code), one layer's cache timed over
and over (at 32 x 320 tokens it stays in the 32 MiB L3); one decode step's attention, `--layers`
layers each with its own cache (DRAM-bound, as in the model); rotary + KV write, RMSNorm and
silu*up for `--seqs` tokens. Median and min of `--repeats` calls after warm-up (the decode step:
of repeats / 20), in microseconds, on torch's OpenMP team. The emulated AVX2 library is checked
for zmm (AVX-512) instructions with objdump.

Writes bench/results/kernel_isa.json. Run from the repo root (under the bench lock):
    flock /tmp/lightspeed-bench.lock .venv/bin/python bench/kernel_isa.py
    flock /tmp/lightspeed-bench.lock .venv/bin/python bench/kernel_isa.py --dtype float32 \
        --out bench/results/kernel_isa_float32.json
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import msgspec
import torch
from harness import RESULTS, Script, main

from lightspeed.models import paged_attention
from lightspeed.models.fused_ops import FusedOps
from lightspeed.models.paged_attention import BuildSpec, PagedDecodeAttention, build_kernel, runnable_isas

logger = logging.getLogger("kernel_isa")

HEADS, KV_HEADS, HIDDEN, FFN = 9, 3, 576, 1536  # SmolLM2-135M


@dataclass(frozen=True)
class Params:
    seqs: int = 32  # decoding sequences (= tokens for the elementwise kernels)
    context: int = 320  # tokens per sequence for paged attention
    block_size: int = 16
    layers: int = 30  # decode step: one cache per layer (SmolLM2-135M has 30)
    repeats: int = 200
    dtype: str = "bfloat16"  # bfloat16 | float32

    def __post_init__(self) -> None:
        if self.dtype not in ("bfloat16", "float32"):
            raise ValueError("--dtype must be bfloat16 or float32")
        if min(self.seqs, self.context, self.block_size, self.layers, self.repeats) < 1:
            raise ValueError("sizes must be >= 1")


def timed(fn: Callable[[], object], repeats: int) -> dict[str, float]:
    """Median / min wall time of one call in microseconds, after a warm-up of repeats / 10."""
    for _ in range(max(1, repeats // 10)):
        fn()
    ns = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        fn()
        ns.append(time.perf_counter_ns() - t0)
    return {"median_us": round(statistics.median(ns) / 1e3, 2), "min_us": round(min(ns) / 1e3, 2)}


def attention_case(p: Params, dim: int, context: int, dtype: torch.dtype) -> Callable[[PagedDecodeAttention], object]:
    """Each sequence's blocks scattered over a shared cache, as after a while of serving."""
    gen = torch.Generator().manual_seed(dim)
    per_seq = -(-context // p.block_size)
    blocks = p.seqs * per_seq
    cache = torch.randn(2, blocks, p.block_size, KV_HEADS, dim, generator=gen).to(dtype)
    tables = torch.randperm(blocks, generator=gen).view(p.seqs, per_seq).int()
    lens = torch.full((p.seqs,), context, dtype=torch.int32)
    query = torch.randn(p.seqs, HEADS, dim, generator=gen).to(dtype)
    scale = 1 / math.sqrt(dim)
    return lambda kernel: kernel(query, cache, tables, lens, scale)


def decode_step_case(p: Params, dim: int, dtype: torch.dtype) -> Callable[[PagedDecodeAttention], object]:
    """One decode step's attention: `--layers` calls, each over its own layer's cache. Together
    they are far larger than the L3 (fp32: 472 MB at 32 x 320 tokens), so K and V stream from
    DRAM as in the model, unlike one layer's cache timed over and over."""
    layers = [attention_case(p, dim, p.context, dtype) for _ in range(p.layers)]
    return lambda kernel: [layer(kernel) for layer in layers]


def elementwise_cases(p: Params, dtype: torch.dtype) -> dict[str, Callable[[FusedOps], object]]:
    gen = torch.Generator().manual_seed(0)
    dim = HIDDEN // HEADS
    qkv = torch.randn(p.seqs, (HEADS + 2 * KV_HEADS) * dim, generator=gen).to(dtype)
    cache = torch.zeros(2, p.seqs, 1, KV_HEADS, dim, dtype=dtype)
    positions, slots = torch.arange(p.seqs) + p.context, torch.arange(p.seqs)
    angles = torch.outer(torch.arange(p.context + p.seqs).float(), torch.rand(dim // 2, generator=gen))
    cos, sin = angles.cos().contiguous(), angles.sin().contiguous()
    x = torch.randn(p.seqs, HIDDEN, generator=gen).to(dtype)
    gate_up = torch.randn(p.seqs, 2 * FFN, generator=gen).to(dtype)
    return {
        "rope_write_kv": lambda ops: ops.rope_write_kv(qkv, positions, cos, sin, cache, slots, HEADS),
        "rms_norm": lambda ops: ops.rms_norm(x, 1e-5),
        "silu_mul": lambda ops: ops.silu_mul(gate_up),
    }


def zmm_instructions(path: Path) -> int | None:
    """How many instructions touch a zmm register (AVX-512); None without objdump."""
    if shutil.which("objdump") is None:
        return None
    out = subprocess.run(["objdump", "-d", str(path)], capture_output=True, text=True, check=True).stdout
    return sum("%zmm" in line for line in out.splitlines())


def measure_isa(p: Params, isa: str, kernel_dir: Path) -> dict[str, object]:
    """Build `isa`'s library into its own (empty) directory and time every kernel with it."""
    dtype = getattr(torch, p.dtype)
    kernel = build_kernel(BuildSpec(isa=isa))
    ops = FusedOps(kernel.lib)
    timings: dict[str, dict[str, float]] = {}
    # --context tokens: the cache is read from DRAM; 32 tokens: it stays in cache (compute-bound).
    for dim, context in ((64, p.context), (80, p.context), (64, 32), (80, 32)):
        call = attention_case(p, dim, context, dtype)
        timings[f"paged_attention_d{dim}_ctx{context}"] = timed(lambda: call(kernel), p.repeats)  # noqa: B023
    step = decode_step_case(p, 64, dtype)  # built here, freed on return: 472 MB in fp32
    timings[f"decode_step_{p.layers}_layers_d64_ctx{p.context}"] = timed(lambda: step(kernel), max(5, p.repeats // 20))
    for name, case in elementwise_cases(p, dtype).items():
        timings[name] = timed(lambda: case(ops), p.repeats)  # noqa: B023
    (library,) = kernel_dir.glob("*.so")
    return {
        "compiled_isa": kernel.isa,
        "flags": list(BuildSpec(isa=isa).flags),
        "zmm_instructions": zmm_instructions(library),
        "timings": timings,
    }


def ratios(per_isa: dict[str, dict[str, object]], base: str) -> dict[str, dict[str, float]]:
    """Median time of each kernel relative to `base`'s (> 1: slower than base)."""
    base_t: dict[str, dict[str, float]] = per_isa[base]["timings"]  # type: ignore[assignment]
    out = {}
    for isa, res in per_isa.items():
        t: dict[str, dict[str, float]] = res["timings"]  # type: ignore[assignment]
        out[isa] = {k: round(v["median_us"] / base_t[k]["median_us"], 2) for k, v in t.items()}
    return out


NOTE = (
    "avx2 on an AVX-512 CPU is compiled with -mno-avx512f: the same cores, caches and memory, "
    "so it isolates the instruction set but not a real AVX2-only CPU's memory bandwidth, cache "
    "sizes or core width (Zen 4 runs 512-bit ops as two 256-bit halves, which flatters AVX2 "
    "against AVX-512 relative to Intel cores with full-width AVX-512 units). scalar defines "
    "LS_PA_SCALAR and disables AVX2/FMA/AVX-512, but gcc still auto-vectorizes the plain C "
    "loops with SSE/AVX. Shared 2-core dev VM: other processes may have run concurrently."
)


def measure(args: argparse.Namespace, p: Params) -> dict[str, object]:
    per_isa: dict[str, dict[str, object]] = {}
    for isa in runnable_isas():
        with tempfile.TemporaryDirectory(prefix=f"kernel-{isa}-") as tmp:
            os.environ[paged_attention.CACHE_ENV] = tmp  # a fresh build per ISA, found by glob
            per_isa[isa] = measure_isa(p, isa, Path(tmp))
            logger.info("%s: %s", isa, per_isa[isa]["timings"])
    return {
        "params": asdict(p),
        "torch_threads": torch.get_num_threads(),
        "per_isa": per_isa,
        "relative_to_avx512": ratios(per_isa, "avx512") if "avx512" in per_isa else None,
        "relative_to_scalar": ratios(per_isa, "scalar"),
        "note": NOTE,
    }


def result_path(args: argparse.Namespace) -> Path:
    return RESULTS / "kernel_isa.json"


def summarize(doc: dict[str, object]) -> None:
    logger.info("relative to avx512: %s", msgspec.json.encode(doc["relative_to_avx512"]).decode())
    logger.info("relative to scalar: %s", msgspec.json.encode(doc["relative_to_scalar"]).decode())


SCRIPT = Script(
    name="kernel_isa",
    doc=__doc__,
    params=Params,
    run=measure,
    result_path=result_path,
    summarize=summarize,
)


if __name__ == "__main__":
    raise SystemExit(main(SCRIPT))
