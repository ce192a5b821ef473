"""The mocker's executor: no model, a modelled sleep per step and random output tokens.

It runs under the same scheduler, block pool and engine core as the native engine, so KV events,
prefix hits, preemption and metrics are real; only the forward pass is simulated.
"""

from __future__ import annotations

import asyncio
import random
import struct
import time
from collections.abc import Iterable

import xxhash

from lightspeed.engine.config import EngineConfig
from lightspeed.engine.types import ModelRunnerOutput, SchedulerOutput
from lightspeed.mocker.timing import MockerTiming

# Below this a real sleep costs more than it models (timer resolution, loop wake-up); such
# steps only yield to the event loop, and the unslept time is carried as a deficit instead.
MIN_SLEEP_S = 50e-6
# Cap on carried time so one stall (GC pause, busy loop) is not repaid by a long burst of
# zero-time steps, which would distort the modelled latency for everyone after it.
MAX_CARRY_S = 0.05
_SEED_KEY = struct.Struct("<QQI")
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
    ) -> None:
        self.config = config
        self.timing = MockerTiming(speedup_ratio)
        self.vocab_size = vocab_size
        self.avoid_token_ids = frozenset(avoid_token_ids)
        if vocab_size <= len(self.avoid_token_ids) + 1:
            raise ValueError("vocab_size leaves no token ids to sample")
        self._rng = random.Random(seed if seed is not None else config.seed)
        # Modelled time not yet slept (positive) or overslept (negative), carried across steps
        # so the average step time matches the model despite coarse timers.
        self._carry = 0.0
        self.num_steps = 0
        self.modelled_seconds = 0.0

    async def execute(self, output: SchedulerOutput) -> ModelRunnerOutput:
        has_decode = False
        sampled: dict[str, int] = {}
        for seq in output.seqs:
            if seq.sample:
                has_decode = True
                seed = seq.sampling.seed
                if seed is None:
                    sampled[seq.request_id] = self._sample(seq.banned_token_ids)
                else:
                    position = seq.start_pos + len(seq.token_ids)
                    sampled[seq.request_id] = self._sample_seeded(seed, position, seq.banned_token_ids)
        seconds = self.timing.step_seconds(output.num_prefill_tokens, output.kv_usage, has_decode)
        self.num_steps += 1
        self.modelled_seconds += seconds
        await self._sleep(seconds)
        return ModelRunnerOutput(sampled=sampled)

    async def _sleep(self, seconds: float) -> None:
        target = self._carry + seconds
        if target < MIN_SLEEP_S:
            self._carry = max(target, -MAX_CARRY_S)
            await asyncio.sleep(0)
            return
        started = time.perf_counter()
        await asyncio.sleep(target)
        slept = time.perf_counter() - started
        self._carry = min(max(target - slept, -MAX_CARRY_S), MAX_CARRY_S)

    def _sample_seeded(self, seed: int, position: int, banned: tuple[int, ...]) -> int:
        """A token fixed by (seed, position): a seeded request gives the same stream on any
        worker, alone or batched, and after preemption or migration."""
        salt = 0
        while True:
            digest = xxhash.xxh3_64_intdigest(_SEED_KEY.pack(seed & _MASK64, position, salt))
            token = digest % self.vocab_size
            if token not in self.avoid_token_ids and token not in banned:
                return token
            salt += 1

    def _sample(self, banned: tuple[int, ...]) -> int:
        avoid = self.avoid_token_ids
        draw = self._rng.random  # int(random() * n) is ~4x cheaper than randrange(n)
        vocab = self.vocab_size
        while True:
            token = int(draw() * vocab)
            if token not in avoid and token not in banned:
                return token
