"""A request as the engine tracks it between steps: tokens, progress, status, block hashes."""

from __future__ import annotations

import enum

from lightspeed.kv_hashing import extend_seq_hashes
from lightspeed.protocol import MAX_STOP_TOKEN_IDS, FinishReason, PreprocessedRequest, SamplingOptions


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5
    FINISHED_ERROR = 6

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED


_FINISH_STATUS = {
    FinishReason.STOP: RequestStatus.FINISHED_STOPPED,
    FinishReason.LENGTH: RequestStatus.FINISHED_LENGTH,
    FinishReason.CANCELLED: RequestStatus.FINISHED_ABORTED,
    FinishReason.ERROR: RequestStatus.FINISHED_ERROR,
}


def finished_status(reason: FinishReason) -> RequestStatus:
    return _FINISH_STATUS[reason]


class Request:
    """Mutable per-request state owned by the scheduler.

    `token_ids` holds prompt + output tokens in one list so chunks slice without copying both.
    `num_computed_tokens` counts tokens whose KV exists; the scheduler schedules the difference
    to `num_tokens`, which covers prefill, chunked prefill, decode and recompute alike.
    Sequence/local block hashes are kept for every full block and extended as tokens arrive.
    """

    __slots__ = (
        "_banned",
        "_hash_blocks",
        "_stop_ids",
        "block_hashes",
        "block_size",
        "cached_reported",
        "hold_kv",
        "local_hashes",
        "lora_name",
        "max_model_len",
        "max_tokens",
        "min_tokens",
        "num_cached_tokens",
        "num_computed_tokens",
        "num_preemptions",
        "num_prompt_tokens",
        "output_token_ids",
        "request_id",
        "sampling",
        "status",
        "token_ids",
    )

    def __init__(
        self,
        request: PreprocessedRequest,
        block_size: int,
        max_model_len: int,
        hash_blocks: bool = True,
        vocab_size: int | None = None,
    ) -> None:
        prompt = list(request.token_ids)
        _validate(request, prompt, max_model_len)
        if vocab_size is not None:
            _validate_ids(request, prompt, vocab_size)
        self.request_id = request.request_id
        self.token_ids: list[int] = prompt
        self.output_token_ids: list[int] = []
        self.num_prompt_tokens = len(prompt)
        self.num_computed_tokens = 0
        self.num_cached_tokens: int | None = None  # prefix hit, measured at first schedule
        self.cached_reported = False
        self.status = RequestStatus.WAITING
        self.sampling: SamplingOptions = request.sampling
        room = max_model_len - len(prompt)
        requested = request.stop.max_tokens
        self.max_tokens = room if requested is None else min(requested, room)
        self.min_tokens = request.stop.min_tokens
        self.max_model_len = max_model_len
        self.lora_name = request.lora_name
        self.block_size = block_size
        self.block_hashes: list[int] = []
        self.local_hashes: list[int] = []
        self.num_preemptions = 0
        # Disaggregated prefill: when the length cap ends it, keep its KV blocks for a transfer.
        self.hold_kv = False
        self._hash_blocks = hash_blocks
        self._init_stop_ids(request)
        if hash_blocks:
            extend_seq_hashes(prompt, block_size, self.block_hashes, self.local_hashes, self.lora_name)

    def _init_stop_ids(self, request: PreprocessedRequest) -> None:
        stop_ids = set(request.stop.stop_token_ids)
        if not request.stop.ignore_eos:
            stop_ids.update(request.eos_token_ids)
        self._stop_ids = frozenset(stop_ids)
        # Ban every id that would end the sequence until min_tokens outputs exist.
        self._banned: tuple[int, ...] = tuple(sorted(stop_ids)) if self.min_tokens > 0 else ()

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status >= RequestStatus.FINISHED_STOPPED

    def banned_token_ids(self) -> tuple[int, ...]:
        """Ids the sampler must not pick this step (stop/EOS ids while below min_tokens)."""
        if self._banned and len(self.output_token_ids) < self.min_tokens:
            return self._banned
        return ()

    def append_output(self, token_id: int) -> None:
        """Record a sampled token; hash the block it completes, if any."""
        self.token_ids.append(token_id)
        self.output_token_ids.append(token_id)
        if self._hash_blocks and len(self.token_ids) % self.block_size == 0:
            extend_seq_hashes(
                self.token_ids,
                self.block_size,
                self.block_hashes,
                self.local_hashes,
                self.lora_name,
            )

    def check_stop(self) -> FinishReason | None:
        """Why the request must stop after its latest output token, or None to continue.

        A stop id (EOS unless ignore_eos, or an explicit stop token id) wins over a length cap
        hit by the same token, since it is the more informative reason; neither stops the
        request before min_tokens outputs, except the hard max_tokens / max_model_len caps.
        """
        num_out = len(self.output_token_ids)
        if num_out >= self.min_tokens and self.output_token_ids[-1] in self._stop_ids:
            return FinishReason.STOP
        if num_out >= self.max_tokens or len(self.token_ids) >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.name}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, outputs={self.num_output_tokens})"
        )


def _validate(request: PreprocessedRequest, prompt: list[int], max_model_len: int) -> None:
    if not prompt:
        raise ValueError(f"request {request.request_id}: prompt is empty")
    if len(prompt) > max_model_len:
        raise ValueError(
            f"request {request.request_id}: prompt has {len(prompt)} tokens, more than max_model_len={max_model_len}"
        )
    max_tokens = request.stop.max_tokens
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"request {request.request_id}: max_tokens must be >= 1, got {max_tokens}")
    if request.stop.min_tokens < 0:
        raise ValueError(f"request {request.request_id}: min_tokens must be >= 0")
    if len(request.stop.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise ValueError(f"request {request.request_id}: more than {MAX_STOP_TOKEN_IDS} stop_token_ids")


def _validate_ids(request: PreprocessedRequest, prompt: list[int], vocab_size: int) -> None:
    """Token ids index the embedding table: the engine checks them itself rather than trust
    every caller of the request plane to have done so (an id past the table is a crash or, on
    a GPU, a device assert that takes every request in the batch down)."""
    for what, ids in (("prompt", prompt), ("stop_token_ids", request.stop.stop_token_ids)):
        if ids and not 0 <= min(ids) <= max(ids) < vocab_size:
            raise ValueError(f"request {request.request_id}: {what} holds a token id outside [0, {vocab_size})")
