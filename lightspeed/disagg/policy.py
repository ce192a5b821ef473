"""Conditional disaggregation (DESIGN §6): prefill remotely, or locally on the decode worker?

Pure: the frontend hands in what it knows about one request and the prefill pool, and gets back
where the prefill runs and why. Moving a prefill to a prefill worker buys the decode worker's
running streams freedom from a long prefill step, and costs a KV transfer plus a second hop; for
a prompt the decode worker already mostly caches, or while every prefill worker is queued up,
the local prefill is the cheaper one. The reason is what `/metrics` counts.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Reason(str, enum.Enum):
    """Why a request was (or was not) prefilled remotely; the `reason` label on /metrics."""

    REMOTE = "remote"  # uncached part large enough: prefill worker, KV transfer, decode worker
    PINNED = "pinned_prefill"  # the client named a prefill worker: the policy is skipped
    ALWAYS = "unconditional"  # conditional disaggregation off: every prefill goes remote
    SMALL_UNCACHED = "local_small_uncached"  # the decode worker caches most of the prompt
    PREFILL_BUSY = "local_prefill_busy"  # every prefill worker is queued past its bound
    NO_PREFILL_WORKERS = "no_prefill_workers"  # aggregated fallback: nothing to send it to
    SINGLE_TOKEN = "local_single_token"  # the first token is the whole answer: nothing to decode
    INCOMPATIBLE = "local_incompatible"  # no prefill worker shares the decode worker's block size


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """Thresholds of the conditional policy. A prefill stays local when its uncached part is
    below *both* bounds: `max_local_prefill_tokens` tokens and `max_local_prefill_frac` of the
    prompt."""

    max_local_prefill_tokens: int = 2048
    max_local_prefill_frac: float = 0.7
    conditional: bool = True  # False: remote whenever a prefill worker can take it

    def __post_init__(self) -> None:
        if self.max_local_prefill_tokens < 0:
            raise ValueError(f"max_local_prefill_tokens must be >= 0; got {self.max_local_prefill_tokens}")
        if not 0.0 <= self.max_local_prefill_frac <= 1.0:
            raise ValueError(f"max_local_prefill_frac must be in [0, 1]; got {self.max_local_prefill_frac}")


@dataclass(frozen=True, slots=True)
class PrefillContext:
    """What the frontend knows about one request when it decides."""

    isl: int  # prompt tokens
    decode_overlap_blocks: int  # leading prompt blocks the chosen decode worker caches
    block_size: int
    prefill_workers: int  # prefill workers able to take it (same block size, reachable)
    prefill_all_busy: bool = False
    pinned_prefill: bool = False
    max_tokens: int | None = None  # None: up to the context

    @property
    def uncached_tokens(self) -> int:
        return max(0, self.isl - self.decode_overlap_blocks * self.block_size)


@dataclass(frozen=True, slots=True)
class Decision:
    remote: bool
    reason: Reason


def decide(ctx: PrefillContext, cfg: PolicyConfig) -> Decision:
    """Where this request's prefill runs. A pinned prefill worker overrides everything but a
    missing pool; the thresholds compare strictly (an uncached part equal to a bound is remote)."""
    if ctx.prefill_workers <= 0:
        return Decision(False, Reason.NO_PREFILL_WORKERS)
    if ctx.pinned_prefill:
        return Decision(True, Reason.PINNED)
    if ctx.max_tokens == 1:
        return Decision(False, Reason.SINGLE_TOKEN)
    if not cfg.conditional:
        return Decision(True, Reason.ALWAYS)
    uncached = ctx.uncached_tokens
    if uncached < cfg.max_local_prefill_tokens and uncached < cfg.max_local_prefill_frac * ctx.isl:
        return Decision(False, Reason.SMALL_UNCACHED)
    if ctx.prefill_all_busy:
        return Decision(False, Reason.PREFILL_BUSY)
    return Decision(True, Reason.REMOTE)
