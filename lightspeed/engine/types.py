"""In-process contracts between the scheduler, the executors and the engine core.

The scheduler decides *what* runs in a step and hands the executor a `SchedulerOutput`; the
executor (a real model runner, or the mocker's timing model) computes it and returns a
`ModelRunnerOutput`; the scheduler folds that back in with `update_from_output`. Neither side
reaches into the other: the scheduler never touches tensors, the runner makes no decisions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from lightspeed.protocol import FinishReason, SamplingOptions, TokenLogprob


@dataclass(slots=True)
class ScheduledSeq:
    """One sequence's share of a step.

    `token_ids` are the tokens whose KV is computed this step, at positions
    `start_pos .. start_pos + len(token_ids) - 1`. `block_ids` is the full block table of the
    sequence (covers at least those positions). When `sample` is set the runner samples one
    next token from the logits of the last scheduled position.
    """

    request_id: str
    token_ids: list[int]
    start_pos: int
    block_ids: list[int]
    sample: bool
    sampling: SamplingOptions
    num_output_tokens: int = 0
    banned_token_ids: tuple[int, ...] = ()  # e.g. EOS before min_tokens is reached
    is_prefill: bool = True


@dataclass(slots=True)
class SchedulerOutput:
    seqs: list[ScheduledSeq]
    # Requests that finished or were aborted since the last step: the runner drops their state.
    finished_request_ids: list[str] = field(default_factory=list)
    num_prefill_tokens: int = 0  # uncached prompt tokens computed this step
    num_decode_tokens: int = 0
    kv_usage: float = 0.0  # active blocks / total blocks, after this step's allocation

    @property
    def is_empty(self) -> bool:
        return not self.seqs


@dataclass(slots=True)
class ModelRunnerOutput:
    sampled: dict[str, int]  # request_id -> next token id (only for seqs with sample=True)
    logprobs: dict[str, TokenLogprob] = field(default_factory=dict)
    # Executors with a timing model (the mocker): modelled seconds from the previous step's
    # outputs to this step's (engine/step_clock.py). None: no model, wall time only.
    modelled_seconds: float | None = None


class Executor(Protocol):
    """Runs one scheduled step. Native: a PyTorch model runner; mocker: a modelled sleep."""

    async def execute(self, output: SchedulerOutput) -> ModelRunnerOutput: ...


@dataclass(frozen=True, slots=True)
class HeldBlocks:
    """KV blocks a finished request left referenced for a transfer (see `KVCacheManager.hold`)."""

    block_ids: list[int]  # block-table order: block i holds tokens i*block_size ..
    block_hashes: list[int]  # sequence hashes of the full blocks among them
    num_tokens: int  # tokens whose KV the blocks hold


@dataclass(slots=True)
class EngineCoreOutput:
    """What the engine core emits per request per step, towards the worker's response stream."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: FinishReason | None = None
    num_cached_tokens: int | None = None  # set once, on the first output of the request
    logprobs: list[TokenLogprob] | None = None
    held: HeldBlocks | None = None  # on the last output of a request run with `hold_kv`
