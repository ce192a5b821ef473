"""The step clock's arithmetic: busy periods, lag, and what idles reset."""

import pytest

from lightspeed.engine.step_clock import StepClock


def test_a_fleet_that_keeps_up_has_no_lag() -> None:
    clock = StepClock()
    clock.begin(10.0)
    clock.end(10.5, 0.5)
    clock.begin(10.5)  # back to back: the period and its anchor carry on
    clock.end(10.75, 0.25)
    reading = clock.reading()
    assert (reading.wall_seconds, reading.modelled_seconds, reading.lag_seconds) == (0.75, 0.75, 0.0)


def test_lag_accumulates_over_a_busy_period_and_idle_resets_it() -> None:
    clock = StepClock()
    clock.begin(0.0)
    clock.end(0.5, 0.25)  # 0.25 s behind
    clock.begin(0.5)
    clock.end(1.0, 0.25)  # 0.5 s behind
    assert clock.lag == 0.5
    clock.idle()
    assert clock.lag == 0.0
    clock.begin(5.0)  # a new period: the idle 4 s are not lag
    clock.end(5.25, 0.25)
    reading = clock.reading()
    assert (reading.wall_seconds, reading.modelled_seconds, reading.lag_seconds) == (1.25, 0.75, 0.0)
    assert clock.take_max_lag() == 0.5
    assert clock.take_max_lag() == 0.0  # reset to the current lag


def test_a_step_ahead_of_its_model_gives_negative_lag() -> None:
    clock = StepClock()
    clock.begin(0.0)
    clock.end(0.125, 0.25)  # a timer that fired early; the mocker carries it into the next sleep
    assert clock.lag == -0.125


def test_steps_without_a_model_count_wall_time_only() -> None:
    clock = StepClock()
    clock.begin(1.0)
    clock.end(1.5, None)
    reading = clock.reading()
    assert (reading.wall_seconds, reading.modelled_seconds, reading.lag_seconds) == (0.5, 0.0, 0.0)


def test_end_without_begin_is_an_error() -> None:
    with pytest.raises(RuntimeError):
        StepClock().end(1.0, 0.5)
