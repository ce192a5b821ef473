"""The async `Executor` over a synchronous `ModelRunner`.

A forward pass blocks for milliseconds to seconds; running it on one dedicated worker thread keeps
the event loop serving requests and streaming tokens meanwhile. One thread, because steps are
strictly sequential (each depends on the KV written by the previous one) and torch already
parallelizes inside an op.

Build it with `NativeExecutor.build(make_runner)` so the weights are loaded on that same thread:
libgomp gives every thread that starts OpenMP regions its own worker team, and once the teams'
threads outnumber the cores it stops spinning between regions, so every op pays a futex wake-up
(~70 us here). A runner loaded on one thread and stepped on another ran decode steps ~1.5x
slower on 2 cores; one thread doing all torch work keeps a single spinning team.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from lightspeed.engine.types import ModelRunnerOutput, SchedulerOutput
from lightspeed.native.runner import ModelRunner

logger = logging.getLogger(__name__)

T = TypeVar("T")


class NativeExecutor:
    def __init__(self, runner: ModelRunner, pool: ThreadPoolExecutor | None = None) -> None:
        self.runner = runner
        self._pool = pool or ThreadPoolExecutor(max_workers=1, thread_name_prefix="lightspeed-model")

    @classmethod
    def build(cls, make_runner: Callable[[], ModelRunner]) -> NativeExecutor:
        """Construct the runner on the model thread itself (see the module doc for why)."""
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lightspeed-model")
        try:
            runner = pool.submit(make_runner).result()
        except BaseException:
            pool.shutdown(wait=False)
            raise
        return cls(runner, pool)

    async def execute(self, output: SchedulerOutput) -> ModelRunnerOutput:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self.runner.execute, output)

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """Run another runner-side call (e.g. KV export/import) on the model thread, in order
        with the steps, so it never races a forward pass over the same cache."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, fn, *args)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)
