"""A frontend's graceful shutdown: let in-flight generations finish, then end the rest properly.

On SIGTERM the frontend stops listening and waits for its generations up to its drain budget
(the drain timeout plus `DRAIN_MARGIN_S`: the workers cut their streams at the drain timeout,
and the frontend reports those to their clients like any lost worker). A generation still
running after that is cut here: its handler task is cancelled while it waits for the next delta,
and `next_delta` turns that cancellation into a `ShuttingDown` error, so a stream ends with an
in-band error event and `[DONE]`, and a whole response is a 503 JSON body — never a connection
dropped mid-transfer. A cut can only land while a handler waits for a delta: the CancelledError
then surfaces inside `next_delta`, not in the middle of writing a chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web

from lightspeed.errors import Overloaded

log = logging.getLogger(__name__)
_T = TypeVar("_T")

# How long past the drain timeout the frontend waits before cutting streams itself: long enough
# to hear of the workers' own cuts (and report them) first.
DRAIN_MARGIN_S = 1.0
# After cutting: time for the cut handlers to write their error events and end their responses.
CUT_GRACE_S = 1.0


class ShuttingDown(Overloaded):
    """The frontend is shutting down and its drain budget is spent."""


@dataclass(eq=False)
class Tracked:
    """One generation being served, and whether it may be cut right now."""

    task: asyncio.Task[Any]
    waiting: bool = False  # awaiting the next delta: the only point where a cut may land
    cut: bool = False


class ActiveStreams:
    """The generations in flight, so shutdown can wait for them and cut what is left."""

    def __init__(self) -> None:
        self._live: set[Tracked] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self.closed = False  # draining: new generations are refused

    def __len__(self) -> int:
        return len(self._live)

    @contextlib.contextmanager
    def track(self) -> Iterator[Tracked]:
        if self.closed:
            raise ShuttingDown("the server is shutting down")
        task = asyncio.current_task()
        assert task is not None, "track() runs inside a request handler"
        tracked = Tracked(task)
        self._live.add(tracked)
        self._idle.clear()
        try:
            yield tracked
        finally:
            self._live.discard(tracked)
            if not self._live:
                self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), max(timeout, 0.0))
        except TimeoutError:
            return False
        return True

    def cut_all(self) -> int:
        """Cut every generation now waiting for a delta; returns how many."""
        cut = 0
        for tracked in self._live:
            if tracked.waiting and not tracked.cut:
                tracked.cut = True
                tracked.task.cancel()
                cut += 1
        return cut

    async def drain(self, budget: float) -> None:
        """Refuse new generations, wait up to `budget` seconds, then cut the rest."""
        self.closed = True
        if await self.wait_idle(budget):
            return
        log.warning("cutting %d streams still running after the %.1fs drain", self.cut_all(), budget)
        if not await self.wait_idle(CUT_GRACE_S):
            log.warning("%d responses did not end after being cut (slow clients?)", len(self))


async def next_delta(deltas: AsyncIterator[_T], tracked: Tracked) -> _T | None:
    """The next item, or None at the end; raises ShuttingDown when the drain cuts the stream."""
    tracked.waiting = True
    try:
        return await anext(deltas, None)
    except asyncio.CancelledError:
        if not tracked.cut:
            raise  # the client went away (or a real cancellation): not ours to swallow
        tracked.task.uncancel()
        raise ShuttingDown("the server is shutting down; the stream was cut before it finished") from None
    finally:
        tracked.waiting = False


async def drain_http(runner: web.AppRunner, streams: ActiveStreams, drain_timeout: float) -> None:
    """Stop accepting connections, drain the generations, then close the server."""
    for site in list(runner.sites):
        await site.stop()
    await streams.drain(drain_timeout + DRAIN_MARGIN_S)
    await runner.cleanup()
