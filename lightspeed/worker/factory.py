"""Build an engine core for a worker: one scheduler, and the executor its config names.

Executors register in `EXECUTORS`; the vLLM adapter will add its own entry later.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lightspeed.config import WorkerConfig
from lightspeed.engine.config import EngineConfig
from lightspeed.engine.core import EngineCore
from lightspeed.engine.types import Executor
from lightspeed.models.registry import ResolvedModel, resolve_model
from lightspeed.protocol import PerfModel

log = logging.getLogger(__name__)

MOCKER_DEFAULT_BLOCKS = 16384  # Dynamo's mocker default
NATIVE_DEFAULT_KV_GB = 2.0


@dataclass
class BuiltEngine:
    core: EngineCore
    num_blocks: int
    served_name: str
    model_folder: Path
    max_model_len: int
    closers: list[Callable[[], None]] = field(default_factory=list)
    perf: PerfModel | None = None  # step-time model published on the worker card

    def close(self) -> None:
        for closer in self.closers:
            closer()


@dataclass(frozen=True)
class ExecutorBuild:
    executor: Executor
    num_blocks: int
    close: Callable[[], None] | None = None
    perf: PerfModel | None = None


def _engine_config(cfg: WorkerConfig, model: ResolvedModel, num_blocks: int) -> EngineConfig:
    max_len = cfg.max_model_len or model.context_length
    return EngineConfig(
        block_size=cfg.block_size,
        num_gpu_blocks=num_blocks,
        max_num_seqs=cfg.max_num_seqs,
        max_num_batched_tokens=cfg.max_num_batched_tokens,
        enable_prefix_caching=cfg.enable_prefix_caching,
        max_model_len=max_len,
        seed=cfg.seed,
        vocab_size=model.vocab_size,
    )


def _build_mocker(cfg: WorkerConfig, model: ResolvedModel) -> ExecutorBuild:
    from lightspeed.mocker.executor import MockerExecutor

    num_blocks = cfg.num_gpu_blocks or MOCKER_DEFAULT_BLOCKS
    ecfg = _engine_config(cfg, model, num_blocks)
    executor = MockerExecutor(
        ecfg,
        speedup_ratio=cfg.speedup_ratio,
        vocab_size=model.vocab_size,
        seed=cfg.seed,
        avoid_token_ids=set(model.eos_token_ids),
    )
    return ExecutorBuild(executor, num_blocks, perf=executor.timing.perf)  # exact: what it sleeps by


def _build_native(cfg: WorkerConfig, model: ResolvedModel) -> ExecutorBuild:
    import torch

    from lightspeed.native.executor import NativeExecutor
    from lightspeed.native.runner import ModelRunner

    source = model.gguf_path if model.gguf_path is not None else model.folder
    # "auto" is decided by the runner: it knows the CPU and can time the loaded model.
    dtype: torch.dtype | Literal["auto"] = "auto" if cfg.dtype == "auto" else getattr(torch, cfg.dtype)

    def make_runner() -> ModelRunner:
        if cfg.num_gpu_blocks:
            return ModelRunner(source, block_size=cfg.block_size, num_blocks=cfg.num_gpu_blocks, dtype=dtype)
        return ModelRunner(
            source, block_size=cfg.block_size, dtype=dtype, kv_cache_gb=cfg.kv_cache_gb or NATIVE_DEFAULT_KV_GB
        )

    # Loaded on the thread that runs the steps: one OpenMP team (see native_executor).
    executor = NativeExecutor.build(make_runner)
    return ExecutorBuild(executor, executor.runner.num_blocks, executor.shutdown)


EXECUTORS: dict[str, Callable[[WorkerConfig, ResolvedModel], ExecutorBuild]] = {
    "mocker": _build_mocker,
    "native": _build_native,
}


def build_engine(cfg: WorkerConfig) -> BuiltEngine:
    model = resolve_model(cfg.model or None)
    built = EXECUTORS[cfg.engine](cfg, model)
    core = EngineCore(_engine_config(cfg, model, built.num_blocks), built.executor)
    served = cfg.served_model_name or model.served_name
    closers = [built.close] if built.close is not None else []
    log.info("built %s engine for %s: %d blocks of %d tokens", cfg.engine, served, built.num_blocks, cfg.block_size)
    return BuiltEngine(
        core, built.num_blocks, served, model.folder, cfg.max_model_len or model.context_length, closers, built.perf
    )
