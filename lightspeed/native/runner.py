"""Executes scheduler steps on a real model: tensors in, sampled tokens out, no decisions.

The runner owns the weights, the paged KV cache (one [2, num_blocks, block_size, kv_heads,
head_dim] tensor per layer) and the per-request sampler state. Block ids in a `SchedulerOutput`
index straight into that cache; which blocks to use is entirely the scheduler's business.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from lightspeed.engine.types import ModelRunnerOutput, ScheduledSeq, SchedulerOutput
from lightspeed.models.attention_metadata import (
    AttentionMetadata,
    batch_order_key,
    build_attention_metadata,
)
from lightspeed.models.linear_ops import OneDnnOps
from lightspeed.models.llama import PagedLlama
from lightspeed.models.panel_gemm import PanelOps
from lightspeed.models.weights import ModelConfig, load_weights
from lightspeed.native.cpu_caps import CpuCaps, detect
from lightspeed.native.dtype_choice import DtypeChoice, choose_dtype, dtype_name
from lightspeed.native.dtype_probe import probe_dtypes
from lightspeed.native.sampler import Sampler, SamplingRow

logger = logging.getLogger(__name__)


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def kv_block_bytes(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block occupies across all layers (K and V)."""
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * element


def blocks_for_budget(config: ModelConfig, block_size: int, dtype: torch.dtype, kv_cache_gb: float) -> int:
    num_blocks = int(kv_cache_gb * (1 << 30)) // kv_block_bytes(config, block_size, dtype)
    if num_blocks < 1:
        raise ValueError(f"kv_cache_gb={kv_cache_gb} holds no block of {block_size} tokens")
    return num_blocks


def compute_backend(model: PagedLlama) -> tuple[str, bool]:
    """The matmul and attention paths in use, and whether one is a slow fallback."""
    onednn = isinstance(model.ops, OneDnnOps)  # PanelOps too: its odd-width weights stay oneDNN's
    if isinstance(model.ops, PanelOps):
        linears = "panel GEMM linears (C) + fused epilogues"
    else:
        linears = "oneDNN packed linears + fused epilogues" if onednn else "aten linears"
    kernel = model.paged_kernel
    attention = "torch attention (gather + SDPA)" if kernel is None else f"C kernels ({kernel.isa} SIMD path)"
    # bf16 on CPU is fast only through oneDNN's packed weights; without the C paged kernel each
    # decode step gathers every sequence's whole context into a padded batch.
    slow_linears = model.dtype == torch.bfloat16 and not onednn
    slow = model.device.type == "cpu" and (slow_linears or kernel is None or kernel.isa == "scalar")
    return f"{linears}, {attention}", slow


def log_compute_setup(model: PagedLlama, choice: DtypeChoice) -> None:
    """One line for the dtype and why, one for the compute backend; slow paths as warnings."""
    level = logging.WARNING if choice.warn else logging.INFO
    logger.log(level, "compute dtype %s: %s", choice.describe(), choice.reason)
    if choice.weight_dtype not in (None, model.weight_dtype):
        logger.warning(
            "weights stay %s: %s storage needs the panel GEMM (C kernel library), unavailable here",
            dtype_name(model.weight_dtype),
            dtype_name(choice.weight_dtype),
        )
    backend, slow = compute_backend(model)
    if slow:
        logger.warning("compute backend: %s (a slow fallback on this CPU / dtype)", backend)
    else:
        logger.info("compute backend: %s", backend)


@dataclass(frozen=True, slots=True)
class StepBatch:
    """One step's device inputs (scheduled seqs reordered decodes-first)."""

    input_ids: torch.Tensor
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # flat token index of each sampled seq's last token
    sampled: list[ScheduledSeq]


class ModelRunner:
    def __init__(
        self,
        model_path: str | Path,
        block_size: int = 16,
        num_blocks: int | None = None,
        kv_cache_gb: float | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | Literal["auto"] | None = None,
        num_threads: int | None = None,
        caps: CpuCaps | None = None,
    ) -> None:
        """`dtype`: see dtype_choice.choose_dtype; `caps`: the CPU to decide it for (default:
        this one, cpu_caps.detect)."""
        if block_size < 1:
            raise ValueError("block_size must be >= 1")
        if (num_blocks is None) == (kv_cache_gb is None):
            raise ValueError("give exactly one of num_blocks and kv_cache_gb")
        if num_blocks is not None and num_blocks < 1:
            raise ValueError("num_blocks must be >= 1")
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self.device = resolve_device(device)
        self.config, self.model = self._load(model_path, dtype, caps or detect())
        self.dtype = self.model.dtype
        self.block_size = block_size
        self.num_blocks = num_blocks or blocks_for_budget(self.config, block_size, self.dtype, kv_cache_gb or 0.0)
        self.kv_caches = self.model.allocate_kv_cache(self.num_blocks, block_size)
        self.layout = self.model.cache_layout(self.num_blocks, block_size)
        self.sampler = Sampler(self.config.vocab_size, self.device)
        logger.info(
            "model %s on %s/%s: %d KV blocks of %d tokens",
            model_path,
            self.device,
            self.dtype,
            self.num_blocks,
            block_size,
        )

    def _load(
        self, model_path: str | Path, dtype: torch.dtype | Literal["auto"] | None, caps: CpuCaps
    ) -> tuple[ModelConfig, PagedLlama]:
        """The weights in the chosen compute dtype (the load-time state is dropped after)."""
        config, state = load_weights(model_path)
        # None: fp32 on CPU (comparable with reference implementations), bf16 on GPUs.
        source = next(iter(state.values())).dtype if state else None
        choice = choose_dtype(dtype, self.device, caps, lambda: probe_dtypes(config, state, self.device), source)
        model = PagedLlama(config, state, choice.dtype, self.device, choice.weight_dtype)
        log_compute_setup(model, choice)
        return config, model

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.config.eos_token_ids

    @property
    def max_model_len(self) -> int:
        return self.config.max_position_embeddings

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        self.sampler.drop(sched.finished_request_ids)
        if not sched.seqs:
            return ModelRunnerOutput(sampled={})
        batch = self._prepare(sched.seqs)
        logits = self.model(batch.input_ids, batch.meta, self.kv_caches, batch.logits_indices)
        if not batch.sampled:
            return ModelRunnerOutput(sampled={})
        rows = [SamplingRow(s.request_id, s.sampling, s.banned_token_ids) for s in batch.sampled]
        results = self.sampler.sample(logits, rows)
        out = ModelRunnerOutput(sampled={})
        for seq, result in zip(batch.sampled, results):
            out.sampled[seq.request_id] = result.token_id
            if result.logprob is not None:
                out.logprobs[seq.request_id] = result.logprob
        return out

    def _prepare(self, scheduled: list[ScheduledSeq]) -> StepBatch:
        # Single-token sequences first: they form the attention group that needs no padding;
        # fresh prompts (position 0) last: they attend over their own tokens, no cache gather.
        seqs = sorted(scheduled, key=lambda s: batch_order_key(len(s.token_ids), s.start_pos))
        self._validate(seqs)
        qlens = [len(s.token_ids) for s in seqs]
        meta = build_attention_metadata(
            qlens, [s.start_pos for s in seqs], [s.block_ids for s in seqs], self.layout, self.device
        )
        ends = list(itertools.accumulate(qlens))
        sampled = [s for s in seqs if s.sample]
        last = [end - 1 for end, s in zip(ends, seqs) if s.sample]
        input_ids = torch.tensor(
            list(itertools.chain.from_iterable(s.token_ids for s in seqs)), dtype=torch.int64, device=self.device
        )
        return StepBatch(input_ids, meta, torch.tensor(last, dtype=torch.int64, device=self.device), sampled)

    def _validate(self, seqs: list[ScheduledSeq]) -> None:
        max_end = 0
        for seq in seqs:
            if not seq.token_ids:
                raise ValueError(f"request {seq.request_id}: scheduled with no tokens")
            ids = seq.block_ids
            if ids and not 0 <= min(ids) <= max(ids) < self.num_blocks:
                raise ValueError(f"request {seq.request_id}: block id out of [0, {self.num_blocks})")
            max_end = max(max_end, seq.start_pos + len(seq.token_ids))
        # Positions past the configured context still get rotary values; the caller decides limits.
        self.model.rotary.ensure(max_end)
