"""What every long-running process (frontend, worker) does around its own work: classify the
errors of its startup phase, and wait for the signal that tells it to stop."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Iterator

from lightspeed.config import ConfigError


@contextlib.contextmanager
def startup_config_errors() -> Iterator[None]:
    """Wrap a startup phase: everything in it is set up from the configuration and nothing is
    served yet, so a ValueError there is the configuration's fault (exit 2, not restarted)."""
    try:
        yield
    except ValueError as err:
        raise ConfigError(str(err)) from err


async def until_signalled() -> None:
    """Return on the first SIGINT or SIGTERM (the supervisor's request to drain and exit)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
