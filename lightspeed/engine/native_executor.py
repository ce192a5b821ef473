"""The async `Executor` over a synchronous `ModelRunner`.

A forward pass blocks for milliseconds to seconds; running it on one dedicated worker thread keeps
the event loop serving requests and streaming tokens meanwhile. One thread, because steps are
strictly sequential (each depends on the KV written by the previous one) and torch already
parallelizes inside an op.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from lightspeed.engine.model_runner import ModelRunner
from lightspeed.engine.types import ModelRunnerOutput, SchedulerOutput

logger = logging.getLogger(__name__)

T = TypeVar("T")


class NativeExecutor:
    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lightspeed-model")

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
