from __future__ import annotations

import asyncio
import os
import signal

import pytest

from lightspeed.config import ConfigError
from lightspeed.runtime.lifecycle import startup_config_errors, until_signalled


def test_a_value_error_during_startup_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError, match="unknown model 'x'"), startup_config_errors():
        raise ValueError("unknown model 'x'")


def test_other_startup_errors_pass_through() -> None:
    with pytest.raises(OSError, match="address in use"), startup_config_errors():
        raise OSError("address in use")


async def test_until_signalled_returns_on_sigterm() -> None:
    waiter = asyncio.create_task(until_signalled())
    await asyncio.sleep(0)  # let it install its handlers
    assert not waiter.done()
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(waiter, timeout=5)
