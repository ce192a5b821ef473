"""The mocker's executor: no model, a modelled sleep per step and random output tokens.

It runs under the same scheduler, block pool and engine core as the native engine, so KV events,
prefix hits, preemption and metrics are real; only the forward pass is simulated.
"""

from __future__ import annotations

import asyncio
import random
import struct
from collections.abc import Iterable

import xxhash

from lightspeed.engine.config import EngineConfig
from lightspeed.engine.types import ModelRunnerOutput, SchedulerOutput
from lightspeed.mocker.timing import MockerTiming
from lightspeed.runtime.clock import WALL_CLOCK, Clock

# Below this a real sleep costs more than it models (timer resolution, loop wake-up); such
# steps only yield to the event loop, and the unslept time is carried as a deficit instead.
MIN_SLEEP_S = 50e-6
# Cap on carried time so one stall (GC pause, busy loop) is not repaid by a long burst of
# zero-time steps, which would distort the modelled latency for everyone after it.
MAX_CARRY_S = 0.05
_SEED_KEY = struct.Struct("<QQI")
# Rejection-sampling attempts before the bounded scan of `_first_allowed`.
MAX_DRAWS = 64
_MASK64 = (1 << 64) - 1


class MockerExecutor:
    """Implements `Executor`. Output ids are uniform over the vocabulary minus `avoid_token_ids`
    (e.g. EOS and special tokens, so sequences run to their length cap as Dynamo's mocker does)
    and minus each sequence's banned ids."""

    def __init__(
        self,
        config: EngineConfig,
        speedup_ratio: float = 1.0,
        vocab_size: int = 32000,
        seed: int | None = None,
        avoid_token_ids: Iterable[int] = (),
        clock: Clock = WALL_CLOCK,
    ) -> None:
        self.config = config
        self.clock = clock
        self.timing = MockerTiming(speedup_ratio)
        self.vocab_size = vocab_size
        self.avoid_token_ids = frozenset(avoid_token_ids)
        if vocab_size <= len(self.avoid_token_ids) + 1:
            raise ValueError("vocab_size leaves no token ids to sample")
        self._rng = random.Random(seed if seed is not None else config.seed)
        # Modelled time not yet slept (positive) or overslept (negative), carried across steps
        # so the average step time matches the model despite coarse timers.
        self._carry = 0.0
        # When the previous step returned its tokens, the decode phase still to run after that
        # (tokens are emitted at its start), and whether the engine has yielded to the event
        # loop since (between steps it only yields when idle or when nothing is schedulable).
        self._last_end: float | None = None
        self._pending_s = 0.0
        self._yielded = True
        self.num_steps = 0
        self.modelled_seconds = 0.0

    async def execute(self, output: SchedulerOutput) -> ModelRunnerOutput:
        # Back to back the step is anchored at the previous step's end; after a yield (or the
        # first step) at now. The step clock measures the modelled time from this anchor.
        now = self.clock.now()
        anchor = self._last_end if self._last_end is not None and not self._yielded else now
        step_start = self._step_start(anchor)
        sampled = self.sample(output)
        prefill_s, decode_s = self.timing.phase_seconds(output.num_prefill_tokens, output.kv_usage, bool(sampled))
        self.num_steps += 1
        self.modelled_seconds += prefill_s + decode_s
        # Tokens leave when the prefill phase ends; the decode phase runs on after that (see
        # timing.py), so it is left pending and delays the next step instead.
        await self._sleep_until(step_start, prefill_s)
        self._mark_step_end(decode_s)
        # Modelled time since the previous outputs (back to back: its decode phase) or since
        # this call (after a yield), to this step's outputs: what the step clock compares.
        return ModelRunnerOutput(sampled=sampled, modelled_seconds=step_start - anchor + prefill_s)

    def sample(self, output: SchedulerOutput) -> dict[str, int]:
        """The next token of every sequence that samples this step (none: no decode phase).
        Public so the replay simulation draws tokens exactly as a live mocker does."""
        sampled: dict[str, int] = {}
        for seq in output.seqs:
            if seq.sample:
                seed = seq.sampling.seed
                if seed is None:
                    sampled[seq.request_id] = self._sample(seq.banned_token_ids)
                else:
                    position = seq.start_pos + len(seq.token_ids)
                    sampled[seq.request_id] = self._sample_seeded(seed, position, seq.banned_token_ids)
        return sampled

    def _step_start(self, anchor: float) -> float:
        """When this step's prefill phase begins: once the previous decode phase is over, and
        no later than when the previous step returned if the engine stayed busy. A busy engine
        runs update -> schedule -> execute without yielding to the event loop, so that
        bookkeeping is part of the step, as in a real engine (and in Dynamo's mocker, which
        sleeps until phase start + modelled time): it is charged against the modelled time
        instead of being added to it. After an idle wait the step starts now at the earliest."""
        if self._last_end is None:
            return anchor
        return max(anchor, self._last_end + self._pending_s)

    def _mark_step_end(self, pending_s: float) -> None:
        self._last_end = self.clock.now()
        self._pending_s = pending_s
        self._yielded = False
        # Runs only once the engine yields to the loop, i.e. not before a back-to-back step.
        asyncio.get_running_loop().call_soon(self._note_yield)

    def _note_yield(self) -> None:
        self._yielded = True

    async def _sleep_until(self, step_start: float, seconds: float) -> None:
        """Sleep so the step lasts `seconds` from `step_start`, plus the carried timer error.
        Bookkeeping longer than the modelled step is not repaid later (nor is it by a deadline
        sleep): only sleep error and sub-timer deficits are carried."""
        budget = max(0.0, seconds + step_start - self.clock.now())  # start may be ahead
        target = self._carry + budget
        if target < MIN_SLEEP_S:
            self._carry = max(target, -MAX_CARRY_S)
            await asyncio.sleep(0)
            return
        started = self.clock.now()
        await self.clock.sleep(target)
        slept = self.clock.now() - started
        self._carry = min(max(target - slept, -MAX_CARRY_S), MAX_CARRY_S)

    def _sample_seeded(self, seed: int, position: int, banned: tuple[int, ...]) -> int:
        """A token fixed by (seed, position): a seeded request gives the same stream on any
        worker, alone or batched, and after preemption or migration."""
        token = 0
        for salt in range(MAX_DRAWS):
            digest = xxhash.xxh3_64_intdigest(_SEED_KEY.pack(seed & _MASK64, position, salt))
            token = digest % self.vocab_size
            if token not in self.avoid_token_ids and token not in banned:
                return token
        return self._first_allowed(token, banned)

    def _sample(self, banned: tuple[int, ...]) -> int:
        avoid = self.avoid_token_ids
        draw = self._rng.random  # int(random() * n) is ~4x cheaper than randrange(n)
        vocab = self.vocab_size
        token = 0
        for _ in range(MAX_DRAWS):
            token = int(draw() * vocab)
            if token not in avoid and token not in banned:
                return token
        return self._first_allowed(token, banned)

    def _first_allowed(self, start: int, banned: tuple[int, ...]) -> int:
        """After MAX_DRAWS rejections (a ban list covering most of the vocabulary), scan once
        from `start`: bounded by the vocabulary, never a loop that a request can make endless.
        Avoided ids are a preference (Dynamo-like run lengths), bans are the request's rule, so
        an avoided id is taken before a banned one; if everything is banned, the ban yields."""
        ban = frozenset(banned)
        order = [(start + i) % self.vocab_size for i in range(self.vocab_size)]
        for token in order:
            if token not in ban and token not in self.avoid_token_ids:
                return token
        return next((t for t in order if t not in ban), start)
