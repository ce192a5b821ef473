"""Liveness heartbeats from a child process's event loop to its supervisor.

A running process is not necessarily a working one: a request that pins the event loop leaves
the process alive but deaf, and checking that the pid exists never notices. So the supervisor
gives each child the write end of a pipe (its number in `HEARTBEAT_FD_ENV`) and the child's
event loop writes one byte to it every `HEARTBEAT_INTERVAL_ENV` seconds. The supervisor reads
the other end on its own loop and notes when the last byte came; it never asks the child
anything, so a stuck child cannot stall it. Only the child's loop writes: a blocked loop goes
silent even though every other thread of the process still runs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from collections.abc import Awaitable, Mapping
from typing import TypeVar

log = logging.getLogger(__name__)

HEARTBEAT_FD_ENV = "LIGHTSPEED_HEARTBEAT_FD"
HEARTBEAT_INTERVAL_ENV = "LIGHTSPEED_HEARTBEAT_INTERVAL"
HEARTBEAT_ENV = (HEARTBEAT_FD_ENV, HEARTBEAT_INTERVAL_ENV)

_T = TypeVar("_T")


# ==================================================================== child side


async def beat(fd: int, interval: float) -> None:
    """Write a byte every `interval` seconds until cancelled or the supervisor is gone."""
    while True:
        try:
            os.write(fd, b".")
        except BlockingIOError:
            pass  # the supervisor is behind on reading; the bytes already queued say we are alive
        except OSError as exc:  # the read end is closed: no supervisor left to tell
            log.warning("heartbeat pipe closed (%s); no longer heartbeating", exc)
            return
        await asyncio.sleep(interval)


async def with_heartbeat(main: Awaitable[_T], environ: Mapping[str, str] = os.environ) -> _T:
    """Await `main` while heartbeating, when a supervisor handed this process a pipe."""
    raw_fd = environ.get(HEARTBEAT_FD_ENV)
    if not raw_fd:
        return await main
    fd = int(raw_fd)
    try:
        # Writing into whatever else holds that number (a leaked variable) would corrupt it.
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            raise OSError(f"fd {fd} is not a pipe")
        # A write must never block the loop it vouches for, even if the supervisor stops reading.
        os.set_blocking(fd, False)
    except OSError as exc:
        log.warning("%s=%s is not usable (%s); not heartbeating", HEARTBEAT_FD_ENV, raw_fd, exc)
        return await main
    task = asyncio.create_task(beat(fd, float(environ.get(HEARTBEAT_INTERVAL_ENV, "1"))), name="heartbeat")
    try:
        return await main
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        os.close(fd)


# ==================================================================== supervisor side


class HeartbeatPipe:
    """The supervisor's end of one child's pipe (a new pipe per start of the child).

    `last_beat` is the loop time of the latest byte, None before the first one: a child is
    not timed until its loop runs, so slow imports and model loading never count as a stall.
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._loop = asyncio.get_running_loop()
        # Non-blocking for both ends (the child's write end shares the flag); close-on-exec so
        # only the child it is passed to (pass_fds) inherits the write end.
        self.read_fd, self.write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.last_beat: float | None = None
        self._open = True
        self._loop.add_reader(self.read_fd, self._read)

    def child_env(self) -> dict[str, str]:
        return {HEARTBEAT_FD_ENV: str(self.write_fd), HEARTBEAT_INTERVAL_ENV: str(self.interval)}

    def close_write_end(self) -> None:
        """Once the child is started (or failed to start): it holds the only write end, so
        the read end sees end-of-file when the child exits."""
        os.close(self.write_fd)

    def silent_for(self) -> float:
        """Seconds since the last beat (0 before the first one). Reads the pipe first: after a
        stall of the supervisor's own loop, beats may be waiting there unread."""
        self._read()
        return 0.0 if self.last_beat is None else self._loop.time() - self.last_beat

    def _read(self) -> None:
        if not self._open:
            return
        try:
            data = os.read(self.read_fd, 4096)
        except BlockingIOError:
            return
        if not data:  # end of file: the child has exited
            self.close()
            return
        self.last_beat = self._loop.time()

    def close(self) -> None:
        if self._open:
            self._open = False
            self._loop.remove_reader(self.read_fd)
            os.close(self.read_fd)
