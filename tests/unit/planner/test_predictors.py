"""Load predictors on known series (step, ramp, sine, noise) and on bad input (NaN, inf, empty)."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lightspeed.planner.predictors import (
    PREDICTORS,
    ArimaPredictor,
    ConstantPredictor,
    KalmanPredictor,
    LoadPredictor,
    MovingAveragePredictor,
    make_predictor,
)

NAMES = sorted(PREDICTORS)


def one_step_errors(predictor: LoadPredictor, series: list[float]) -> list[float]:
    """|forecast - actual| for each interval, forecasting before observing it."""
    errors = []
    for y in series:
        errors.append(abs(predictor.predict() - y))
        predictor.observe(y)
    return errors


def forecasts(predictor: LoadPredictor, series: list[float]) -> list[float]:
    out = []
    for y in series:
        out.append(predictor.predict())
        predictor.observe(y)
    return out


RAMP = [5.0 + 2.0 * t for t in range(40)]  # slope 2 per interval
SINE = [100.0 + 50.0 * math.sin(2 * math.pi * t / 20) for t in range(80)]  # period 20 intervals
STEP = [10.0] * 5 + [20.0] * 5


def test_registry_names() -> None:
    assert NAMES == ["arima", "constant", "kalman", "moving-average"]
    for name in NAMES:
        assert isinstance(make_predictor(name), LoadPredictor)


@pytest.mark.parametrize("name", NAMES)
def test_empty_history_predicts_zero(name: str) -> None:
    assert make_predictor(name).predict() == 0.0


@pytest.mark.parametrize("name", NAMES)
def test_only_non_finite_observations_predict_zero(name: str) -> None:
    p = make_predictor(name)
    for v in (math.nan, math.inf, -math.inf, math.nan):
        p.observe(v)
    assert p.predict() == 0.0


@pytest.mark.parametrize("name", NAMES)
def test_non_finite_observations_are_skipped(name: str) -> None:
    clean, dirty = make_predictor(name), make_predictor(name)
    for y in RAMP[:12]:
        clean.observe(y)
        dirty.observe(y)
        dirty.observe(math.nan)
        dirty.observe(math.inf)
    assert dirty.predict() == pytest.approx(clean.predict())


@pytest.mark.parametrize("name", NAMES)
def test_falling_to_zero_never_forecasts_negative(name: str) -> None:
    p = make_predictor(name)
    for y in (50.0, 40.0, 30.0, 20.0, 10.0, 0.0, 0.0):
        p.observe(y)
        assert p.predict() >= 0.0
    # trend-following predictors would say -10 here without the clamp
    assert make_predictor(name).predict() == 0.0


@pytest.mark.parametrize("name", NAMES)
def test_single_observation_forecasts_it(name: str) -> None:
    p = make_predictor(name)
    p.observe(7.5)
    assert p.predict() == pytest.approx(7.5)


def test_constant_lags_a_step_by_one_interval() -> None:
    # forecast of interval t is the value of t-1: 10 through the first 20, then 20
    assert forecasts(ConstantPredictor(), STEP) == [0.0, 10, 10, 10, 10, 10, 20, 20, 20, 20]


def test_moving_average_on_a_step() -> None:
    # window 2: forecast = mean of the last two values
    got = forecasts(MovingAveragePredictor(window=2), STEP)
    assert got == [0.0, 10, 10, 10, 10, 10, 15, 20, 20, 20]


def test_constant_and_moving_average_lag_a_ramp() -> None:
    # constant is one slope behind (2); a window-5 mean is (1+2+3+4+5)/5 * slope = 3 slopes behind (6)
    assert max(one_step_errors(ConstantPredictor(), RAMP)[5:]) == pytest.approx(2.0)
    assert max(one_step_errors(MovingAveragePredictor(window=5), RAMP)[5:]) == pytest.approx(6.0)


def test_kalman_local_trend_tracks_a_ramp() -> None:
    # local-linear-trend model: no steady-state error on a ramp; within 0.01 after 10 intervals
    errors = one_step_errors(KalmanPredictor(), RAMP)
    assert max(errors[10:]) < 0.01


def test_kalman_local_level_lags_a_ramp() -> None:
    # without the trend state the filter is exponential smoothing: it lags a ramp by > 1 slope
    errors = one_step_errors(KalmanPredictor(trend=False), RAMP)
    assert min(errors[10:]) > 2.0


def test_kalman_follows_a_sine() -> None:
    # period 20 intervals, amplitude 50: one-step error stays within 0.4 of the amplitude (20)
    assert max(one_step_errors(KalmanPredictor(), SINE)[20:]) < 20.0


def test_kalman_smooths_noise_better_than_constant() -> None:
    rng = random.Random(1)
    noisy = [100.0 + rng.gauss(0.0, 10.0) for _ in range(200)]
    smooth = KalmanPredictor(level_noise=1.0, obs_noise=100.0, trend=False)
    kalman_mae = sum(one_step_errors(smooth, noisy)[20:]) / 180
    constant_mae = sum(one_step_errors(ConstantPredictor(), noisy)[20:]) / 180
    # constant's error is |n_t - n_(t-1)|, about 1.13 sigma; the filter's about 0.8 sigma + a bit
    assert kalman_mae < 0.8 * constant_mae


def test_arima_tracks_a_ramp_exactly() -> None:
    # differences are a constant 2: the drift and AR fits both forecast y_T + 2 (to 1e-9)
    errors = one_step_errors(ArimaPredictor(p=2), RAMP)
    assert max(errors[2:]) < 1e-9


def test_arima_ar2_tracks_a_sine() -> None:
    # differences of a sinusoid obey d_t = 2 cos(w) d_(t-1) - d_(t-2): AR(2) fits it exactly once
    # there are 2p + 2 = 6 differences (7 observations)
    errors = one_step_errors(ArimaPredictor(p=2), SINE)
    assert max(errors[7:]) < 1e-6


def test_arima_drift_before_enough_history() -> None:
    # 3 observations, 2 differences (< 2p + 2): forecast = last + mean difference = 30 + (10+5)/2
    p = ArimaPredictor(p=2)
    for y in (15.0, 25.0, 30.0):
        p.observe(y)
    assert p.predict() == pytest.approx(37.5)


def test_arima_history_window_bounds_the_fit() -> None:
    # a level shift far in the past falls out of a 10-observation window
    p = ArimaPredictor(p=1, history=10)
    for y in [1000.0] * 5 + [10.0] * 20:
        p.observe(y)
    assert p.predict() == pytest.approx(10.0)


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("moving-average", {"window": 0}),
        ("arima", {"p": 0}),
        ("arima", {"p": 4, "history": 8}),
        ("kalman", {"obs_noise": -1.0}),
        ("kalman", {"level_noise": math.nan}),
        ("kalman", {"level_noise": 0.0, "obs_noise": 0.0}),
        ("constant", {"window": 3}),
        ("prophet", {}),
    ],
)
def test_bad_config_raises_value_error(name: str, params: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        make_predictor(name, **params)


@given(
    st.sampled_from(NAMES),
    st.lists(
        st.one_of(
            st.floats(min_value=-1e6, max_value=1e6),
            st.just(math.nan),
            st.just(math.inf),
            st.just(-math.inf),
        ),
        max_size=40,
    ),
)
def test_forecast_always_finite_and_non_negative(name: str, values: list[float]) -> None:
    p = make_predictor(name)
    for v in values:
        p.observe(v)
        f = p.predict()
        assert math.isfinite(f)
        assert f >= 0.0
