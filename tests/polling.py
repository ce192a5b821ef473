"""Wait in a test until something another process or task does becomes visible."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable


async def until(
    predicate: Callable[[], bool] | Callable[[], Awaitable[bool]],
    timeout: float = 30.0,
    what: str | Callable[[], str] = "",
    interval: float = 0.05,
) -> None:
    """Poll `predicate` (plain or async) every `interval` seconds; fail the test after `timeout`
    seconds, naming `what` (a callable is asked at that moment, e.g. for the last value seen)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        done = predicate()
        if inspect.isawaitable(done):
            done = await done
        if done:
            return
        if asyncio.get_running_loop().time() >= deadline:
            raise AssertionError(f"timed out waiting for {what() if callable(what) else what}")
        await asyncio.sleep(interval)
