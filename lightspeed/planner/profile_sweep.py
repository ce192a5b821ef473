"""Drive one engine through a profiling sweep and record the time of every measured step.

`lightspeed profile` measures the engine a worker runs (built by the worker's own factory), in
process, through its own `EngineCore.step()`: the real scheduler, KV cache and executor, with no
network in between. Two kinds of step are measured, the two the step-time model (`PerfModel`)
describes, each the way its latency shows up to a client:

* decode: a batch of B sequences of context L, every one decoding (no prefill in the step). Steps
  run back to back, as in a busy worker, and each is timed emission to emission (from the end of
  the previous step to the end of this one), which is the inter-token latency. The mocker emits
  a step's tokens before its decode phase and sleeps that phase at the start of the next step, so
  only emission-to-emission time holds a whole decode phase (engine/step_clock.py does the same).
  Each point records the KV usage p the scheduler reported for the step.
* prefill: one fresh prompt of t uncached tokens (random ids: no prefix hit), computed in one step
  that also samples its first token, timed from the call to the outputs: the prefill part of a
  time to first token. The engine first rests for as long as its slowest decode step, so work an
  engine defers past its outputs (the mocker's decode phase, at most one decode step) is over and
  not charged to the prefill. The scheduler counts such a step as prefill only
  (`num_decode_tokens` = 0), and so does the worker's online fit (worker/perf_fit.py).

Every cell starts with `warmup` steps that are not recorded (first-touch allocation, caches, the
mocker's carried timer error). A decode cell first prefills its B prompts (chunked by the step
budget); those setup steps are not recorded either. A step that does not look like the cell it was
meant to measure (a prefix hit, a preemption) fails the sweep with RuntimeError rather than
recording a wrong point.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import msgspec

from lightspeed.engine.config import EngineConfig
from lightspeed.engine.core import EngineCore, RequestStream, StepInfo
from lightspeed.protocol import PreprocessedRequest, StopConditions
from lightspeed.runtime.clock import WALL_CLOCK, Clock

log = logging.getLogger(__name__)

MIN_TOKEN_ID = 100  # prompt ids are drawn at or above this: below sit a vocabulary's special tokens
_FALLBACK_VOCAB = 32000  # an engine that does not check ids (EngineConfig.vocab_size None)
MAX_SETTLE_S = 1.0  # cap on the rest before a prefill step

Phase = Literal["prefill", "decode"]


class ProfilePoint(msgspec.Struct, frozen=True):
    """One measured step. Prefill: `prefill_tokens` = t, `batch_size` 0. Decode: `batch_size` B
    sequences of nominal context `context_len` (the cell's prompt length), no prefill tokens."""

    phase: Phase
    prefill_tokens: int
    batch_size: int
    context_len: int
    kv_usage: float
    ms: float  # wall milliseconds


@dataclass(frozen=True, slots=True)
class SweepSpec:
    """What to measure: prefill sizes (uncached prompt tokens per step), decode batch sizes x
    context lengths, and how many steps per cell (`warmup` unrecorded, then `repeats`)."""

    prefill_sizes: tuple[int, ...]
    batch_sizes: tuple[int, ...]
    context_lens: tuple[int, ...]
    repeats: int = 5
    warmup: int = 2

    def __post_init__(self) -> None:
        for name in ("prefill_sizes", "batch_sizes", "context_lens"):
            values = getattr(self, name)
            if not values:
                raise ValueError(f"{name} must not be empty")
            if any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in values):
                raise ValueError(f"{name} must hold positive integers, got {list(values)}")
        if isinstance(self.repeats, bool) or not isinstance(self.repeats, int) or self.repeats < 1:
            raise ValueError(f"repeats must be an integer >= 1, got {self.repeats!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup must be an integer >= 0, got {self.warmup!r}")

    @property
    def steps_per_cell(self) -> int:
        return self.warmup + self.repeats


@dataclass(frozen=True, slots=True)
class DecodeCell:
    batch_size: int
    context_len: int


def decode_cells(spec: SweepSpec, cfg: EngineConfig) -> tuple[list[DecodeCell], list[DecodeCell]]:
    """Check the sweep against the engine; return (decode cells that fit, cells skipped because
    the KV cache cannot hold them without preempting). ValueError for a sweep the engine can never
    run: a prefill size over the step budget or the context length, a batch over max_num_seqs, a
    context with no room left to decode in, or no decode cell that fits the cache at all."""
    for t in spec.prefill_sizes:
        if t > cfg.max_num_batched_tokens:
            raise ValueError(f"prefill size {t} exceeds max_num_batched_tokens={cfg.max_num_batched_tokens}")
        if t > cfg.max_model_len:
            raise ValueError(f"prefill size {t} exceeds the context length max_model_len={cfg.max_model_len}")
    for b in spec.batch_sizes:
        if b > cfg.max_num_seqs:
            raise ValueError(f"batch size {b} exceeds max_num_seqs={cfg.max_num_seqs}")
    fits: list[DecodeCell] = []
    skipped: list[DecodeCell] = []
    for b, ctx in itertools.product(sorted(set(spec.batch_sizes)), sorted(set(spec.context_lens))):
        longest = _longest_context(b, ctx, spec, cfg)
        if longest > cfg.max_model_len:
            raise ValueError(
                f"context length {ctx} leaves no room for batch {b}: its sequences reach {longest} tokens "
                f"(setup steps + {spec.steps_per_cell} measured) > max_model_len={cfg.max_model_len}"
            )
        blocks = b * math.ceil(longest / cfg.block_size) + cfg.watermark_blocks
        (fits if blocks <= cfg.num_gpu_blocks else skipped).append(DecodeCell(b, ctx))
    if not fits:
        raise ValueError(
            f"no decode cell fits the KV cache ({cfg.num_gpu_blocks} blocks of {cfg.block_size} tokens); "
            "lower --batch-sizes / --context-lens or raise --num-gpu-blocks"
        )
    return fits, skipped


def _longest_context(batch: int, context: int, spec: SweepSpec, cfg: EngineConfig) -> int:
    """Tokens of the longest sequence at a decode cell's last step: its prompt, one token per
    setup step after its own prefill (at most one per step that prefills the batch) and one
    per measured step."""
    setup_steps = math.ceil(batch * context / cfg.max_num_batched_tokens) + 1
    return context + setup_steps + spec.steps_per_cell


Progress = Callable[[int], None]


class SweepRunner:
    """Runs a `SweepSpec` on an idle `EngineCore` it drives step by step (not `core.run()`)."""

    def __init__(self, core: EngineCore, spec: SweepSpec, seed: int = 0, clock: Clock = WALL_CLOCK) -> None:
        self.core = core
        self.clock = clock  # the engine's clock: a virtual one in tests, then every point is exact
        self.spec = spec
        self.cells, self.skipped = decode_cells(spec, core.config)
        self._rng = random.Random(seed)
        self._vocab = core.config.vocab_size or _FALLBACK_VOCAB
        self._progress: Progress = lambda _n: None
        self._infos: list[StepInfo] = []
        self._ids = itertools.count()
        core.on_step = self._infos.append
        core.on_kv_events = lambda _events: None  # nobody subscribes; do not let them queue up

    @property
    def total_steps(self) -> int:
        """Steps recorded or warmed up, for a progress bar (decode setup steps not counted)."""
        cells = len(self.cells) + len(self.spec.prefill_sizes)
        return cells * self.spec.steps_per_cell

    async def run(self, progress: Progress | None = None) -> list[ProfilePoint]:
        """Decode cells first: their slowest step sets the rest before each prefill step.
        `progress(n)` is called as steps complete (warm-up ones included)."""
        if progress is not None:
            self._progress = progress
        points: list[ProfilePoint] = []
        for cell in self.cells:
            points += await self._decode_cell(cell)
        settle = min(MAX_SETTLE_S, max(p.ms for p in points) / 1000.0)
        for t in self.spec.prefill_sizes:
            points += await self._prefill_cell(t, settle)
        return points

    async def _decode_cell(self, cell: DecodeCell) -> list[ProfilePoint]:
        streams = [self._add(cell.context_len, max_tokens=None) for _ in range(cell.batch_size)]
        await self._until_all_decode(cell)
        points: list[ProfilePoint] = []
        last = self.clock.now()
        for i in range(self.spec.steps_per_cell):
            info = await self._step()
            now = self.clock.now()
            _expect(info, 0, cell.batch_size, f"decode cell B={cell.batch_size} L={cell.context_len}")
            if i >= self.spec.warmup:
                ms = (now - last) * 1000.0
                points.append(ProfilePoint("decode", 0, cell.batch_size, cell.context_len, info.kv_usage, ms))
            last = now
            self._progress(1)
        for stream in streams:
            self.core.abort(stream.request_id, notify=False)
        return points

    async def _until_all_decode(self, cell: DecodeCell) -> None:
        """Step the batch's prompts through prefill (chunked by the step budget) until a step
        decodes every sequence and prefills nothing. Twice the steps that should take means the
        batch never decodes together (the scheduler keeps preempting): fail instead of spinning."""
        steps_left = 2 * math.ceil(cell.batch_size * cell.context_len / self.core.config.max_num_batched_tokens) + 2
        info = await self._step()
        while info.num_prefill_tokens > 0 or info.num_decode_tokens < cell.batch_size:
            steps_left -= 1
            if steps_left <= 0:
                raise RuntimeError(
                    f"decode cell B={cell.batch_size} L={cell.context_len}: the batch never decodes together"
                )
            info = await self._step()

    async def _prefill_cell(self, tokens: int, settle_s: float) -> list[ProfilePoint]:
        points: list[ProfilePoint] = []
        for i in range(self.spec.steps_per_cell):
            await self.clock.sleep(settle_s)
            stream = self._add(tokens, max_tokens=1)
            start = self.clock.now()
            info = await self._step()
            ms = (self.clock.now() - start) * 1000.0
            _expect(info, tokens, 0, f"prefill of {tokens} tokens")
            if self.core.num_unfinished:
                raise RuntimeError(f"prefill of {tokens} tokens did not finish in one step")
            del stream  # finished: its output is not needed
            if i >= self.spec.warmup:
                points.append(ProfilePoint("prefill", tokens, 0, tokens, info.kv_usage, ms))
            self._progress(1)
        return points

    def _add(self, tokens: int, max_tokens: int | None) -> RequestStream:
        """Queue a fresh random prompt. The caller holds the stream while the request runs: the
        core aborts a request whose stream was dropped."""
        rid = f"profile-{next(self._ids)}"
        prompt = [self._rng.randrange(MIN_TOKEN_ID, self._vocab) for _ in range(tokens)]
        stop = StopConditions(max_tokens=max_tokens, ignore_eos=True)
        return self.core.add_request(PreprocessedRequest(rid, "profile", prompt, stop=stop))

    async def _step(self) -> StepInfo:
        """One executed step (an empty schedule is retried) and what it did."""
        count = len(self._infos)
        while len(self._infos) == count:
            if not self.core.num_unfinished:
                raise RuntimeError("profiling step found no work")
            await self.core.step()
        info = self._infos[-1]
        self._infos.clear()
        return info


def _expect(info: StepInfo, prefill: int, decode: int, what: str) -> None:
    if info.num_prefill_tokens != prefill or info.num_decode_tokens != decode:
        raise RuntimeError(
            f"{what}: the step computed {info.num_prefill_tokens} prefill and {info.num_decode_tokens} decode "
            f"tokens, expected {prefill} and {decode} (a prefix hit or a preemption; use a larger KV cache)"
        )


def default_sizes(top: int, start: int, factor: int) -> tuple[int, ...]:
    """start, start*factor, ... below `top`, then `top` itself: a geometric grid ending at a limit."""
    sizes = [start]
    while sizes[-1] * factor < top:
        sizes.append(sizes[-1] * factor)
    sizes = [s for s in sizes if s < top]
    return (*sizes, top)


def default_spec(cfg: EngineConfig, repeats: int = 5, warmup: int = 2) -> SweepSpec:
    """A sweep for this engine when flags name none: prefill sizes doubling from 64 to the step
    budget, batch sizes x4 from 1 to max_num_seqs, and contexts that take the largest batch to
    about 1/16, 1/4, 1/2, 3/4 and 9/10 of the KV cache (capped by the context length)."""
    prefill = default_sizes(min(cfg.max_num_batched_tokens, cfg.max_model_len), min(64, cfg.max_num_batched_tokens), 2)
    batches = default_sizes(cfg.max_num_seqs, 1, 4)
    capacity = cfg.num_gpu_blocks * cfg.block_size
    top = min(int(0.9 * capacity / batches[-1]), cfg.max_model_len // 2)
    contexts = sorted({max(1, int(top * f)) for f in (1 / 16, 1 / 4, 1 / 2, 3 / 4, 1.0)})
    return SweepSpec(prefill, batches, tuple(contexts), repeats, warmup)
