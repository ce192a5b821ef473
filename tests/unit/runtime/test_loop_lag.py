"""The loop-lag monitor sees a blocked event loop and reports the worst lag once per read."""

import asyncio
import time

import pytest

from lightspeed.runtime.loop_lag import LoopLagMonitor


async def test_a_blocked_loop_shows_as_lag() -> None:
    monitor = LoopLagMonitor(interval=0.01)
    monitor.start()
    await asyncio.sleep(0.03)  # let it take a few quiet samples
    time.sleep(0.1)  # the point: a coroutine that hogs the loop for 100 ms
    await asyncio.sleep(0.03)
    await monitor.stop()
    # The sleep due 10 ms after its start ran >= 90 ms late; nothing can make it earlier.
    assert monitor.take_max() >= 0.09 and monitor.total_lag >= 0.09 and monitor.samples >= 2
    assert monitor.take_max() == 0.0  # reset by the read


def test_record_clamps_early_wakeups_and_validates() -> None:
    monitor = LoopLagMonitor()
    monitor.record(-0.001)  # a timer that fired a hair early is no lag
    assert (monitor.total_lag, monitor.take_max(), monitor.samples) == (0.0, 0.0, 1)
    with pytest.raises(ValueError):
        LoopLagMonitor(interval=0)
