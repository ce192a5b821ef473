"""The virtual clock moves only when slept or advanced, and still yields to the loop."""

import asyncio

import pytest

from lightspeed.runtime.clock import VirtualClock, WallClock


async def test_virtual_sleep_moves_time_exactly_and_yields() -> None:
    clock = VirtualClock(start=2.0)
    ran: list[float] = []

    async def other() -> None:
        ran.append(clock.now())

    task = asyncio.create_task(other())
    await clock.sleep(0.25)
    await task
    assert clock.now() == 2.25 and ran == [2.25]
    await clock.sleep(-1.0)  # a negative sleep is no sleep, as asyncio's
    assert clock.now() == 2.25


def test_advance_refuses_to_run_backwards() -> None:
    clock = VirtualClock()
    clock.advance(0.5)
    assert clock.now() == 0.5
    with pytest.raises(ValueError):
        clock.advance(-0.1)


async def test_wall_clock_is_monotonic() -> None:
    clock = WallClock()
    before = clock.now()
    await clock.sleep(0)
    assert clock.now() >= before
