"""Load predictors: forecast the next interval's value of one metric (request rate, ISL, OSL).

Every predictor has the same two methods (`LoadPredictor`): `observe(value)` once per adjustment
interval, `predict()` for the next one. All of them skip non-finite observations (NaN, ±inf),
predict 0.0 before any finite observation, and never return a negative or non-finite value (a
forecast below zero is clamped to 0.0; a forecast that is not finite falls back to the last
observation). `PREDICTORS` maps a name to a factory; `make_predictor` builds one by name.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class LoadPredictor(Protocol):
    """One metric's forecaster: feed each interval's value, ask for the next interval's."""

    def observe(self, value: float) -> None: ...

    def predict(self) -> float: ...


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except TypeError:
        return False


def _safe(forecast: float, fallback: float) -> float:
    """Clamp a forecast to a finite, non-negative number (`fallback` when it is not finite)."""
    if not _finite(forecast):
        forecast = fallback if _finite(fallback) else 0.0
    return max(0.0, float(forecast))


def _positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def _non_negative(name: str, value: float) -> float:
    if not _finite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


class ConstantPredictor:
    """Next interval = last (finite) observation. Lags any change by exactly one interval."""

    def __init__(self) -> None:
        self._last: float | None = None

    def observe(self, value: float) -> None:
        if _finite(value):
            self._last = float(value)

    def predict(self) -> float:
        return 0.0 if self._last is None else _safe(self._last, 0.0)


class MovingAveragePredictor:
    """Next interval = mean of the last `window` finite observations."""

    def __init__(self, window: int = 5) -> None:
        self._values: deque[float] = deque(maxlen=_positive_int("window", window))

    def observe(self, value: float) -> None:
        if _finite(value):
            self._values.append(float(value))

    def predict(self) -> float:
        if not self._values:
            return 0.0
        return _safe(math.fsum(self._values) / len(self._values), self._values[-1])


class KalmanPredictor:
    """1-D Kalman filter on a local-level (`trend=False`) or local-linear-trend model.

    State x = [level, slope]; each interval level += slope + w_level, slope += w_slope, and the
    observation is level + v. Noise variances, in the series' units squared:
    `level_noise` = Var(w_level) (how fast the level wanders), `trend_noise` = Var(w_slope) (how
    fast the slope changes; unused without trend), `obs_noise` = Var(v) (measurement noise of one
    interval's value). Only their ratios shape the gain: larger process noise relative to
    `obs_noise` follows changes faster and smooths less. The first finite observation sets the
    level (slope 0) with a diffuse covariance. `predict()` is the one-step-ahead forecast
    level + slope (level alone without trend). Plain Python, 2x2 matrices.
    """

    def __init__(
        self, level_noise: float = 1.0, trend_noise: float = 0.1, obs_noise: float = 1.0, trend: bool = True
    ) -> None:
        self.q_level = _non_negative("level_noise", level_noise)
        self.q_trend = _non_negative("trend_noise", trend_noise) if trend else 0.0
        self.r = _non_negative("obs_noise", obs_noise)
        if self.r == 0 and self.q_level == 0:
            raise ValueError("level_noise and obs_noise cannot both be 0")
        self.trend = trend
        self._x: list[float] | None = None  # [level, slope]
        self._p = [[0.0, 0.0], [0.0, 0.0]]
        self._last = 0.0

    def observe(self, value: float) -> None:
        if not _finite(value):
            return
        z = float(value)
        self._last = z
        if self._x is None:
            self._x = [z, 0.0]
            diffuse = 1e6 * (1.0 + z * z)  # slope unknown: a prior far wider than the series
            self._p = [[self.r, 0.0], [0.0, diffuse if self.trend else 0.0]]
            return
        self._time_update()
        self._measurement_update(z)

    def _time_update(self) -> None:
        assert self._x is not None
        (p00, p01), (p10, p11) = self._p
        if self.trend:  # x = F x, P = F P F^T + Q with F = [[1, 1], [0, 1]]
            self._x = [self._x[0] + self._x[1], self._x[1]]
            p00, p01, p10 = p00 + p01 + p10 + p11, p01 + p11, p10 + p11
        self._p = [[p00 + self.q_level, p01], [p10, p11 + self.q_trend]]

    def _measurement_update(self, z: float) -> None:
        assert self._x is not None
        (p00, p01), (p10, p11) = self._p
        s = p00 + self.r  # innovation variance, H = [1, 0]
        k0, k1 = p00 / s, p10 / s
        innovation = z - self._x[0]
        self._x = [self._x[0] + k0 * innovation, self._x[1] + k1 * innovation]
        self._p = [[(1 - k0) * p00, (1 - k0) * p01], [p10 - k1 * p00, p11 - k1 * p01]]

    def predict(self) -> float:
        if self._x is None:
            return 0.0
        level, slope = self._x
        return _safe(level + slope if self.trend else level, self._last)


class ArimaPredictor:
    """ARIMA(p, 1, 0), i.e. an AR(p) model with intercept on the first differences.

    This is not a full ARIMA: no moving-average terms, no seasonal terms, no model selection.
    Each `predict()` refits by ordinary least squares (numpy `lstsq`, minimum-norm when the
    design is rank-deficient, e.g. a perfect ramp) over the last `history` observations:
    d_t = c + phi_1 d_(t-1) + ... + phi_p d_(t-p), d_t = y_t - y_(t-1); forecast
    y_(T+1) = y_T + d_hat. With fewer than 2p + 2 differences it uses the mean difference
    (a drift model); with one observation, that observation.
    """

    def __init__(self, p: int = 2, history: int = 64) -> None:
        self.p = _positive_int("p", p)
        self.history = _positive_int("history", history)
        if self.history < 2 * self.p + 3:
            raise ValueError(f"history must be >= 2p + 3 = {2 * self.p + 3}, got {history}")
        self._values: deque[float] = deque(maxlen=self.history)

    def observe(self, value: float) -> None:
        if _finite(value):
            self._values.append(float(value))

    def predict(self) -> float:
        if not self._values:
            return 0.0
        last = self._values[-1]
        if len(self._values) == 1:
            return _safe(last, 0.0)
        diffs = np.diff(np.asarray(self._values, dtype=np.float64))
        return _safe(last + self._next_diff(diffs), last)

    def _next_diff(self, d: np.ndarray[Any, np.dtype[np.float64]]) -> float:
        p = self.p
        if len(d) < 2 * p + 2:
            return float(d.mean())
        n = len(d) - p
        lags = [d[p - i - 1 : p - i - 1 + n] for i in range(p)]  # column i: d_(t-1-i)
        design = np.column_stack([np.ones(n), *lags])
        try:
            beta = np.linalg.lstsq(design, d[p:], rcond=None)[0]
        except np.linalg.LinAlgError:
            return float(d.mean())
        latest = np.concatenate(([1.0], d[::-1][:p]))  # [1, d_T, d_(T-1), ...]
        return float(latest @ beta)


PREDICTORS: dict[str, Callable[..., LoadPredictor]] = {
    "constant": ConstantPredictor,
    "moving-average": MovingAveragePredictor,
    "kalman": KalmanPredictor,
    "arima": ArimaPredictor,
}


def make_predictor(name: str, **params: Any) -> LoadPredictor:
    """Build the predictor registered as `name` (ValueError for an unknown name or bad params)."""
    try:
        factory = PREDICTORS[name]
    except KeyError:
        raise ValueError(f"unknown predictor {name!r}; choose one of {sorted(PREDICTORS)}") from None
    try:
        return factory(**params)
    except TypeError as exc:
        raise ValueError(f"bad parameters for predictor {name!r}: {exc}") from None
