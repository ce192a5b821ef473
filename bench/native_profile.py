"""Native engine step time in the AVX-512 profile vs an emulated AVX2-only CPU, fp32 and bf16.

Each (ISA profile, dtype) runs in its own process (torch reads ATEN_CPU_CAPABILITY, oneDNN
ONEDNN_MAX_CPU_ISA, MKL MKL_ENABLE_INSTRUCTIONS, our C kernels LIGHTSPEED_KERNEL_ISA, once at
start): "avx2" sets all but MKL's to AVX2, "avx2_mkl" all four; "native" leaves this CPU's ISA.
Configurations alternate over `--rounds` rounds (other processes on a shared 2-core machine
stall OpenMP teams for whole seconds); each keeps its fastest round. The runner is timed on the real SmolLM2-135M in two step shapes:

  prefill  one fresh `--prefill-tokens`-token prompt;
  decode   `--decode-seqs` sequences, one token each, at position `--context` (their cache
           blocks hold zeros: attention costs the same whatever the keys hold).

Wall-clock timers wrap the runner's phases (batch preparation, the model forward, the sampler)
and, inside the forward, the matmuls (`model.ops`), attention, rotary + KV write, and the norms;
"other" is the rest of the forward (embedding, silu * up, Python between the calls). Decode
is also timed with one OpenMP thread. bf16 is forced even where the engine would convert it to
fp32 (the runner is told the unrestricted CPU), to see what emulated bf16 costs.

    flock /tmp/lightspeed-bench.lock .venv/bin/python bench/native_profile.py
Smoke test (tiny step shapes, one repeat):  .venv/bin/python bench/native_profile.py --smoke
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from harness import ROOT, Script, Smoke, cpu_info, main

logger = logging.getLogger("native_profile")

AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "LIGHTSPEED_KERNEL_ISA": "avx2"}
PROFILES: dict[str, dict[str, str]] = {
    "native": {},
    "avx2": AVX2_ENV,
    # MKL (aten's fp32 BLAS here) reads none of those: this one caps it too.
    "avx2_mkl": AVX2_ENV | {"MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}
DTYPES = ("float32", "bfloat16")
CHILD = "--child"  # internal: measure one configuration in this process
SMOKE = Smoke("native_profile_isa", {"prefill_tokens": 32, "decode_seqs": 4, "context": 32, "repeats": 1, "rounds": 1})


@dataclass(frozen=True)
class Params:
    prefill_tokens: int = 256
    decode_seqs: int = 16
    context: int = 256  # each decoding sequence's position
    repeats: int = 5  # timed steps per shape (after two untimed ones); the median counts
    block_size: int = 16
    rounds: int = 2


# ---------------------------------------------------------------------------- the child


class PhaseTimer:
    """Accumulates wall time per phase name; `wrap` replaces an instance's method with a timed one."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}

    def wrap(self, obj: object, method: str, phase: str) -> None:
        inner = getattr(obj, method)

        def timed(*a: Any, **kw: Any) -> Any:
            start = time.perf_counter()
            try:
                return inner(*a, **kw)
            finally:
                self.totals[phase] = self.totals.get(phase, 0.0) + time.perf_counter() - start

        setattr(obj, method, timed)


class TimedCall:
    """The model, its calls timed as "forward"; attributes pass through."""

    def __init__(self, model: Any, timer: PhaseTimer) -> None:
        self.model, self.timer = model, timer

    def __call__(self, *a: Any) -> Any:
        start = time.perf_counter()
        try:
            return self.model(*a)
        finally:
            self.timer.totals["forward"] = time.perf_counter() - start

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


def instrument(runner: Any) -> PhaseTimer:
    timer = PhaseTimer()
    timer.wrap(runner, "_prepare", "prepare")
    timer.wrap(runner.sampler, "sample", "sampler")
    model = runner.model
    runner.model = TimedCall(model, timer)  # `model(...)` looks __call__ up on the type, not the instance
    for method in ("_attention", "_rotate_and_cache", "_rms_norm"):
        timer.wrap(model, method, method.strip("_"))
    for method in ("linear", "linear_add", "linear_silu", "linear_mul", "linear_glu"):
        if hasattr(model.ops, method):
            timer.wrap(model.ops, method, "gemm")
    return timer


def steps(runner: Any, p: Params) -> dict[str, Any]:
    """The two step shapes, as scheduler outputs the runner executes."""
    from lightspeed.engine.types import ScheduledSeq, SchedulerOutput
    from lightspeed.protocol import SamplingOptions

    blocks = -(-(max(p.prefill_tokens, p.context + 1)) // p.block_size)

    def seq(i: int, tokens: list[int], start: int) -> ScheduledSeq:
        return ScheduledSeq(
            f"r{i}",
            tokens,
            start,
            list(range(i * blocks, (i + 1) * blocks)),
            True,
            SamplingOptions(),
            is_prefill=start == 0,
        )

    prompt = [100 + (7 * t) % 40000 for t in range(p.prefill_tokens)]
    prefill = SchedulerOutput([seq(0, prompt, 0)])
    decode = SchedulerOutput([seq(i, [500 + i], p.context) for i in range(p.decode_seqs)])
    return {"prefill": prefill, "decode": decode}


def time_shape(runner: Any, timer: PhaseTimer, sched: Any, repeats: int) -> dict[str, float]:
    """Median ms per phase over `repeats` steps, after two untimed ones."""
    samples: list[dict[str, float]] = []
    for i in range(repeats + 2):
        timer.totals.clear()
        start = time.perf_counter()
        runner.execute(sched)
        if i >= 2:
            samples.append({"step": time.perf_counter() - start, **timer.totals})
    out = {k: round(statistics.median(s[k] for s in samples) * 1e3, 2) for k in samples[0]}
    inner = ("gemm", "attention", "rotate_and_cache", "rms_norm")
    out["forward_other"] = round(out["forward"] - sum(out.get(k, 0.0) for k in inner), 2)
    out["step_other"] = round(out["step"] - out["prepare"] - out["forward"] - out.get("sampler", 0.0), 2)
    return out


def child(dtype: str, p: Params) -> int:
    import torch

    from lightspeed.models.registry import packaged_gguf_path
    from lightspeed.native.cpu_caps import CPUINFO, caps_from
    from lightspeed.native.runner import ModelRunner, compute_backend

    blocks = (p.decode_seqs + 1) * -(-(max(p.prefill_tokens, p.context + 1)) // p.block_size)
    # The unrestricted CPU's caps: bf16 stays bf16 (emulated under the AVX2 profile).
    caps = caps_from(CPUINFO.read_text(), {})
    runner = ModelRunner(
        packaged_gguf_path(), block_size=p.block_size, num_blocks=blocks, dtype=getattr(torch, dtype), caps=caps
    )
    timer = instrument(runner)
    shapes = steps(runner, p)
    result: dict[str, Any] = {name: time_shape(runner, timer, sched, p.repeats) for name, sched in shapes.items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    result["decode_1_thread_ms"] = time_shape(runner, timer, shapes["decode"], p.repeats)["step"]
    torch.set_num_threads(threads)
    result |= {
        "threads": threads,
        "backend": compute_backend(runner.model)[0],
        "aten_capability": torch.backends.cpu.get_cpu_capability(),
        "paged_kernel": type(runner.model.paged_kernel).__name__ if runner.model.paged_kernel else None,
    }
    sys.stdout.write(json.dumps(result) + "\n")  # the parent reads the last stdout line
    return 0


# ---------------------------------------------------------------------------- the parent


def run_config(profile: str, dtype: str, p: Params) -> dict[str, object]:
    """One (profile, dtype) in a child process: it prints its measurement as JSON."""
    env = {k: v for k, v in os.environ.items() if k not in PROFILES["avx2_mkl"]} | PROFILES[profile]
    cmd = [sys.executable, __file__, CHILD, dtype, json.dumps(asdict(p))]
    logger.info("profile %s %s", profile, dtype)
    out = subprocess.run(cmd, env=env, cwd=ROOT, check=True, stdout=subprocess.PIPE, text=True)  # stderr: ours
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return {"profile": profile, "isa_env": PROFILES[profile], "dtype": dtype, **result}


def step_ms(run: dict[str, Any]) -> float:
    """Prefill + decode step time: the round to keep is the least disturbed one."""
    return float(run["prefill"]["step"] + run["decode"]["step"])


def measure(args: argparse.Namespace, p: Params) -> dict[str, object]:
    configs = [(profile, dtype) for profile in PROFILES for dtype in DTYPES]
    rounds = [[run_config(profile, dtype, p) for profile, dtype in configs] for _ in range(p.rounds)]
    runs = [min(tries, key=step_ms) for tries in zip(*rounds)]
    cpu = cpu_info()
    return {
        "params": asdict(p),
        "cpu": cpu["model"],
        "cpu_flags": cpu["flags"],
        "threads": len(os.sched_getaffinity(0)),
        "note": "wall-clock medians in ms; phases are timed with Python wrappers (~1 us each, "
        "a few hundred calls per step); the machine is shared, so expect +-10%",
        "runs": runs,
        "rounds_step_ms": {
            f"{r['profile']} {r['dtype']}": [step_ms(t) for t in tries] for r, tries in zip(runs, zip(*rounds))
        },
    }


def summarize(doc: dict[str, object]) -> None:
    for run in doc["runs"]:  # type: ignore[attr-defined]
        logger.info(
            "%-6s %-8s prefill %s ms, decode %s ms (1 thread: %s ms), backend: %s",
            run["profile"],
            run["dtype"],
            run["prefill"]["step"],
            run["decode"]["step"],
            run["decode_1_thread_ms"],
            run["backend"],
        )


SCRIPT = Script(
    name="native_profile",
    doc=__doc__,
    params=Params,
    run=measure,
    result_path=SMOKE.result_path,
    add_flags=SMOKE.add_flags,
    check=SMOKE.check,
    summarize=summarize,
)

if __name__ == "__main__":
    if sys.argv[1:2] == [CHILD]:
        raise SystemExit(child(sys.argv[2], Params(**json.loads(sys.argv[3]))))
    raise SystemExit(main(SCRIPT))
