"""Start, watch and stop local child processes (the embedded `lightspeed serve`).

Children are plain `python -m lightspeed ...` processes in their own process group. A child
that exits unexpectedly is logged and restarted (with exponential backoff) so one crash does not
take the service down; a child that keeps crashing is given up on after `max_restarts` restarts in
a row (a run longer than `stable_seconds` clears the count, so a long-lived server is not given up
on for crashes days apart). A child that exits with CONFIG_ERROR_EXIT (2: a bad value, an unknown
model) is never restarted, since it would fail the same way again: the supervisor fails at once.
On shutdown every child gets SIGTERM (graceful drain), then SIGKILL after a grace period.

Liveness (`liveness_seconds` > 0): a process that exists may still be stuck, its event loop
pinned by one bad request. Each child's loop heartbeats through a pipe (heartbeat.py); a child
whose last heartbeat is older than `liveness_seconds` is SIGKILLed and restarted like a crash.
A child is timed from its first heartbeat, so slow imports and model loading never count.

`ChildSpec.on_exit` is told the pid of every child process that exits, at once: `serve` uses it
to drop a dead worker's discovery entry, so frontends stop routing to it without waiting out the
entry's TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from lightspeed.config import CONFIG_ERROR_EXIT
from lightspeed.runtime.heartbeat import HEARTBEAT_ENV, HeartbeatPipe

log = logging.getLogger(__name__)


@dataclass
class ChildSpec:
    name: str
    args: list[str]  # arguments after `python -m lightspeed`
    env: dict[str, str] = field(default_factory=dict)
    restart: bool = True
    # interpreter arguments before `args`: every child is a Python process
    python_args: tuple[str, ...] = ("-m", "lightspeed")
    on_exit: Callable[[int], object] | None = None  # called with the pid of each exited process
    group: str = ""  # children of one group are scaled together (`scale_to`)


@dataclass
class _Child:
    spec: ChildSpec
    proc: asyncio.subprocess.Process | None = None
    restarts: int = 0  # restarts in a row, without a stable run in between
    started_at: float = 0.0
    pulse: HeartbeatPipe | None = None  # this start's heartbeat pipe (liveness on)
    retired: bool = False  # being stopped for good by `scale_to`: never restarted


class Supervisor:
    def __init__(
        self,
        grace_seconds: float = 10.0,
        max_restarts: int = 5,
        backoff_seconds: float = 0.25,
        stable_seconds: float = 60.0,
        liveness_seconds: float = 0.0,
    ) -> None:
        if grace_seconds <= 0 or backoff_seconds < 0 or stable_seconds <= 0 or max_restarts < 0:
            raise ValueError("supervisor: grace and stable periods must be > 0, backoff and restarts >= 0")
        if liveness_seconds < 0:
            raise ValueError("supervisor: liveness_seconds must be >= 0 (0 = off)")
        self._grace = grace_seconds
        self._liveness = liveness_seconds
        self._max_restarts = max_restarts
        self._backoff = backoff_seconds
        self._stable = stable_seconds
        self._children: list[_Child] = []
        self._spawned: dict[str, int] = {}  # children ever spawned per group: the next fresh index
        self._watchers: list[asyncio.Task[None]] = []
        self._stopping = False
        self.failed = asyncio.Event()  # set when a child has exited for good
        self.failed_code: int | None = None  # that child's exit code

    async def spawn(self, spec: ChildSpec) -> None:
        child = _Child(spec)
        self._children.append(child)
        if spec.group:
            self._spawned[spec.group] = self._spawned.get(spec.group, 0) + 1
        await self._start(child)
        self._watchers.append(asyncio.create_task(self._watch(child), name=f"watch-{spec.name}"))
        if self._liveness > 0:
            self._watchers.append(asyncio.create_task(self._check_liveness(child), name=f"liveness-{spec.name}"))

    async def _start(self, child: _Child) -> None:
        # Never pass on a pipe number this process was given itself: it means nothing to the child.
        env = {k: v for k, v in os.environ.items() if k not in HEARTBEAT_ENV} | child.spec.env
        pass_fds: tuple[int, ...] = ()
        if self._liveness > 0:
            # Several beats per timeout, so one late beat is never taken for a stuck loop.
            child.pulse = HeartbeatPipe(interval=min(1.0, self._liveness / 5))
            env.update(child.pulse.child_env())
            pass_fds = (child.pulse.write_fd,)
        try:
            child.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                *child.spec.python_args,
                *child.spec.args,
                env=env,
                start_new_session=True,
                pass_fds=pass_fds,
            )
        except BaseException:
            if child.pulse is not None:
                child.pulse.close()
            raise
        finally:
            if child.pulse is not None:
                child.pulse.close_write_end()
        child.started_at = asyncio.get_running_loop().time()
        log.info("started %s (pid %d)", child.spec.name, child.proc.pid)

    async def _watch(self, child: _Child) -> None:
        while True:
            assert child.proc is not None
            code = await child.proc.wait()
            self._exited(child)
            if self._stopping or child.retired:
                return
            if code == CONFIG_ERROR_EXIT:
                log.error("%s exited with a configuration error (exit %d); not restarting", child.spec.name, code)
                self._fail(code)
                return
            log.error("%s exited with code %s", child.spec.name, code)
            if asyncio.get_running_loop().time() - child.started_at >= self._stable:
                child.restarts = 0
            if not child.spec.restart or child.restarts >= self._max_restarts:
                log.error("%s will not be restarted", child.spec.name)
                self._fail(code)
                return
            child.restarts += 1
            await asyncio.sleep(min(2.0**child.restarts * self._backoff, 5.0))
            if self._stopping or child.retired:
                return
            await self._start(child)

    def _exited(self, child: _Child) -> None:
        if child.pulse is not None:
            child.pulse.close()
            child.pulse = None
        if child.spec.on_exit is not None and child.proc is not None:
            try:
                child.spec.on_exit(child.proc.pid)
            except Exception:  # a cleanup hook must not stop the restart
                log.exception("on_exit hook of %s failed", child.spec.name)

    async def _check_liveness(self, child: _Child) -> None:
        """SIGKILL a child whose loop went silent; `_watch` then restarts it like any crash."""
        while True:
            await asyncio.sleep(self._liveness / 10)
            pulse, proc = child.pulse, child.proc
            if child.retired:
                return
            if pulse is None or proc is None or proc.returncode is not None or self._stopping:
                continue
            silent = pulse.silent_for()
            if silent > self._liveness:
                log.error(
                    "%s (pid %d) sent no heartbeat for %.1fs (its event loop is stuck); killing it",
                    child.spec.name,
                    proc.pid,
                    silent,
                )
                pulse.last_beat = None  # killed once is enough; the restart brings a new pipe
                _signal(proc, signal.SIGKILL)

    def _fail(self, code: int) -> None:
        if not self.failed.is_set():  # the first failure is the one to report
            self.failed_code = code
        self.failed.set()

    @property
    def pids(self) -> list[int]:
        return [c.proc.pid for c in self._children if c.proc is not None and c.proc.returncode is None]

    def group_size(self, group: str) -> int:
        """Children of `group` that are not being retired (running or about to restart)."""
        return len(self._group(group))

    def _group(self, group: str) -> list[_Child]:
        return [c for c in self._children if c.spec.group == group and not c.retired]

    async def scale_to(
        self,
        group: str,
        n: int,
        make_spec: Callable[[int], ChildSpec],
        before_retire: Callable[[int], Awaitable[object]] | None = None,
    ) -> int:
        """Grow or shrink `group` to `n` children; returns n.

        Growing spawns `make_spec(i)` for fresh indices i. Shrinking retires the newest children:
        each is marked retired at once (it no longer counts and is never restarted), then, in the
        background so a long drain does not hold up the caller, `before_retire(pid)` runs (serve
        deregisters the worker there, so routers stop sending it requests) and the child gets
        SIGTERM: a worker then drains its in-flight streams and exits; SIGKILL only after the
        grace period.
        """
        if n < 0:
            raise ValueError(f"scale_to: n must be >= 0; got {n}")
        live = self._group(group)
        for child in reversed(live[n:]):
            child.retired = True
            self._watchers.append(
                asyncio.create_task(self._retire(child, before_retire), name=f"retire-{child.spec.name}")
            )
        for _ in range(n - len(live)):
            spec = make_spec(self._spawned.get(group, 0))
            spec.group = group
            await self.spawn(spec)
        return n

    async def _retire(self, child: _Child, before: Callable[[int], Awaitable[object]] | None) -> None:
        proc = child.proc
        if proc is not None and proc.returncode is None:
            if before is not None:
                try:
                    await before(proc.pid)
                except Exception:  # a failed hook must not leave the child running forever
                    log.exception("before-retire hook of %s failed", child.spec.name)
            log.info("retiring %s (pid %d): draining", child.spec.name, proc.pid)
            _signal(proc, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), self._grace)
            except TimeoutError:
                log.warning("%s did not drain in %.0fs; killing", child.spec.name, self._grace)
                _signal(proc, signal.SIGKILL)
                await proc.wait()
        self._children.remove(child)

    async def stop(self) -> None:
        """SIGTERM everyone, wait for the grace period, SIGKILL what is left."""
        self._stopping = True
        live = [c.proc for c in self._children if c.proc is not None and c.proc.returncode is None]
        for proc in live:
            _signal(proc, signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in live)), self._grace)
        except TimeoutError:
            for proc in live:
                if proc.returncode is None:
                    log.warning("pid %d did not stop in %.0fs; killing", proc.pid, self._grace)
                    _signal(proc, signal.SIGKILL)
            await asyncio.gather(*(p.wait() for p in live))
        for task in self._watchers:
            task.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)


def _signal(proc: asyncio.subprocess.Process, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
