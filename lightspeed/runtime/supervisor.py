"""Start, watch and stop local child processes (the embedded `lightspeed serve`).

Children are plain `python -m lightspeed ...` processes in their own process group. A child
that exits unexpectedly is logged and restarted (with backoff) so one crash does not take the
service down; on shutdown every child gets SIGTERM (graceful drain), then SIGKILL after a grace
period.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass
class ChildSpec:
    name: str
    args: list[str]  # arguments after `python -m lightspeed`
    env: dict[str, str] = field(default_factory=dict)
    restart: bool = True


@dataclass
class _Child:
    spec: ChildSpec
    proc: asyncio.subprocess.Process | None = None
    restarts: int = 0


class Supervisor:
    def __init__(self, grace_seconds: float = 10.0, max_restarts: int = 5) -> None:
        self._grace = grace_seconds
        self._max_restarts = max_restarts
        self._children: list[_Child] = []
        self._watchers: list[asyncio.Task[None]] = []
        self._stopping = False
        self.failed = asyncio.Event()  # set when a child has exited for good

    async def spawn(self, spec: ChildSpec) -> None:
        child = _Child(spec)
        self._children.append(child)
        await self._start(child)
        self._watchers.append(asyncio.create_task(self._watch(child), name=f"watch-{spec.name}"))

    async def _start(self, child: _Child) -> None:
        env = {**os.environ, **child.spec.env}
        child.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "lightspeed", *child.spec.args, env=env, start_new_session=True
        )
        log.info("started %s (pid %d)", child.spec.name, child.proc.pid)

    async def _watch(self, child: _Child) -> None:
        while True:
            assert child.proc is not None
            code = await child.proc.wait()
            if self._stopping:
                return
            log.error("%s exited with code %s", child.spec.name, code)
            if not child.spec.restart or child.restarts >= self._max_restarts:
                log.error("%s will not be restarted", child.spec.name)
                self.failed.set()
                return
            child.restarts += 1
            await asyncio.sleep(min(2.0**child.restarts * 0.25, 5.0))
            await self._start(child)

    @property
    def pids(self) -> list[int]:
        return [c.proc.pid for c in self._children if c.proc is not None and c.proc.returncode is None]

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
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
