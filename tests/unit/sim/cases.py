"""Small fleets and hand-built request lists for the replay tests."""

from __future__ import annotations

from collections.abc import Sequence

from lightspeed.bench.workload import RequestSpec
from lightspeed.engine.config import EngineConfig
from lightspeed.protocol import DEFAULT_PERF_MODEL
from lightspeed.sim.config import FleetConfig, PlannerSettings, ReplayConfig, TraceSlice
from lightspeed.sim.simulation import SimOutcome, Simulation

# Tiny engines: 4-token blocks, so block boundaries are easy to count by hand.
SMALL_ENGINE = EngineConfig(
    block_size=4, num_gpu_blocks=64, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64
)


def prefill_s(tokens: int, speedup: float = 1.0) -> float:
    """Dynamo's prefill polynomial (DESIGN §5), in seconds."""
    a, b, c = DEFAULT_PERF_MODEL.prefill_coeffs
    return (a * tokens * tokens + b * tokens + c) / 1000.0 / speedup


def decode_s(active_blocks: int, total_blocks: int = 64, speedup: float = 1.0) -> float:
    """Dynamo's decode polynomial at KV usage active / total, in seconds."""
    d, e, f = DEFAULT_PERF_MODEL.decode_coeffs
    p = active_blocks / total_blocks
    return max(1.0, d * p * p + e * p + f) / 1000.0 / speedup


def config(
    workers: int = 1,
    router_mode: str = "round-robin",
    planner: PlannerSettings | None = None,
    engine: EngineConfig = SMALL_ENGINE,
    speedup_ratio: float = 1.0,
) -> ReplayConfig:
    fleet = FleetConfig(workers=workers, engine=engine, speedup_ratio=speedup_ratio, router_mode=router_mode)
    return ReplayConfig(TraceSlice(path="in-memory"), fleet, planner or PlannerSettings())


def simulate(cfg: ReplayConfig, specs: Sequence[RequestSpec]) -> SimOutcome:
    return Simulation(cfg, iter(specs)).run()


def spec(prompt: Sequence[int], max_tokens: int, at: float = 0.0) -> RequestSpec:
    return RequestSpec(tuple(prompt), max_tokens, True, at)
