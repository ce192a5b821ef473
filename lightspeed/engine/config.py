"""Engine configuration shared by the scheduler, the KV cache manager and both executors."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Sizing and policy knobs of one engine instance. Defaults match Dynamo's mocker."""

    block_size: int = 64
    num_gpu_blocks: int = 16384
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    max_model_len: int = 8192
    # Fraction of blocks kept free when admitting a new request while others run, so running
    # requests can grow a few steps before preemption kicks in (Dynamo's mocker uses 0.01).
    watermark: float = 0.01
    seed: int | None = None
    # The model's vocabulary: token ids of a request are checked against it (None = unchecked).
    vocab_size: int | None = None

    def __post_init__(self) -> None:
        for name in ("block_size", "num_gpu_blocks", "max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.max_model_len, int) or self.max_model_len <= 0:
            raise ValueError(f"max_model_len must be a positive integer, got {self.max_model_len!r}")
        if not 0.0 <= self.watermark < 1.0:
            raise ValueError(f"watermark must be in [0, 1), got {self.watermark}")
        # A lone request must always fit, otherwise it would preempt itself forever.
        if self.max_model_len > self.num_gpu_blocks * self.block_size:
            raise ValueError(
                f"max_model_len ({self.max_model_len}) exceeds the KV cache capacity "
                f"({self.num_gpu_blocks} blocks x {self.block_size} tokens); lower max_model_len "
                "or give the cache more blocks"
            )
        # Without chunking a prompt is computed in one step, so the budget must hold the longest.
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError("max_num_batched_tokens must be >= max_model_len when chunked prefill is disabled")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")

    @property
    def watermark_blocks(self) -> int:
        return int(self.watermark * self.num_gpu_blocks)
