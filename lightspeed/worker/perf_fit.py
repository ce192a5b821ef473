"""Fit a worker's step-time model from its own measured steps, for latency-aware routing.

The mocker knows its model exactly; a real engine must measure. Each executed step gives
(prefill tokens t, decode tokens, KV usage p, seconds). We fit the shape every consumer evaluates
(`PerfModel`): step_ms = prefill(t) + decode(p), prefill(t) = a*t^2 + b*t + c for t > 0 and
decode(p) = d*p^2 + e*p + f where the step decoded, over a sliding window of recent steps.

The router trusts what a card publishes, so the fit must stay physically sane, and a plain least
squares does not: when usage barely moves (a large KV cache, a light load) the decode quadratic
is unidentified and swung to (-367972, 24421, 96) ms. So:
  * Shape constraints, by non-negative least squares (`nnls`): a, b, c >= 0 (prefill never
    shrinks with more tokens), and decode written as f + u*(p - p^2/2) + v*(p^2/2) with
    f, u, v >= 0, i.e. e = u, d = (v - u)/2. Both basis curves rise on [0, 1], and every
    quadratic that is non-negative and non-decreasing on [0, 1] is such a combination
    (e = d'(0) >= 0, v = e + 2d = d'(1) >= 0, f = d(0) >= 0), so the constraint is exactly
    "non-negative and non-decreasing over every possible usage", not only the range seen.
  * A usage span too narrow to show a slope (< `min_usage_span`) fits a flat decode (u = v = 0):
    the data say what a decode step costs at today's usage and nothing about the slope, and a
    flat curve is the least extrapolation. Rejecting instead would leave a lightly loaded worker
    forever on the GPU-sized default model, far from its real step times.
  * Median regression of the relative miss (least absolute deviations of (predicted - measured)
    / predicted, by iteratively reweighted least squares): the heavy tail of slow steps (GC
    pauses, a busy neighbour on a shared CPU, often 5-10x the typical step) pulls no more than
    any other row, so the fit tracks the median step, not the mean; and relative, since such
    noise multiplies, so 30 ms decode steps count as much as second-long prefills. Relative to
    the prediction, not the measurement: dividing by the measured time would pull a level fitted
    through spread data (decode time set by the batch, not the usage) well below its median.
  * Thin data are rejected: too few prefill or decode steps, too few distinct prefill sizes or
    too narrow a ratio between the largest and smallest (the slope is then unidentified).
  * A sanity bound: at the largest prefill sizes and the highest usages seen (the top quarter;
    every decode step for a level decode), the median of measured / predicted must lie within
    `max_error_ratio` both ways.
A rejected fit keeps the last good one (`fit()` returns it; None before any), and `rejected`
says why, so the worker republishes nothing new on thin or odd data.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from lightspeed.protocol import PerfModel
from lightspeed.worker.nnls import nnls

log = logging.getLogger(__name__)

Array = NDArray[np.float64]
# Coefficient order of the design matrix: prefill a, b, c; decode f, u, v (see the module doc).
_PREFILL, _DECODE = slice(0, 3), slice(3, 6)
_TOP_QUANTILE = 0.75  # "the largest sizes seen": the top quarter
_IRLS_ROUNDS = 30
_MIN_SCALE_MS = 1e-3  # predictions below this count as this in the reweighting
_EXACT = 1e-4  # relative misses below this count as this in the reweighting


@dataclass(frozen=True, slots=True)
class StepSample:
    prefill_tokens: int
    decode_tokens: int
    kv_usage: float
    seconds: float


@dataclass(frozen=True, slots=True)
class FitLimits:
    """When a fit is trusted. Defaults suit a window of a few hundred steps."""

    min_prefill_steps: int = 8
    min_decode_steps: int = 8  # steps that only decoded
    min_prefill_sizes: int = 3  # distinct prefill token counts
    min_prefill_ratio: float = 2.0  # largest / smallest prefill token count
    min_usage_span: float = 0.1  # max - min usage of decode steps, below it decode is flat
    max_error_ratio: float = 1.5  # measured / predicted medians at the top of the range seen

    def __post_init__(self) -> None:
        if min(self.min_prefill_steps, self.min_decode_steps, self.min_prefill_sizes) < 1:
            raise ValueError("minimum step counts must be >= 1")
        if self.min_prefill_ratio < 1.0 or self.max_error_ratio < 1.0:
            raise ValueError("min_prefill_ratio and max_error_ratio must be >= 1")
        if self.min_usage_span < 0.0:
            raise ValueError("min_usage_span must be >= 0")


@dataclass(frozen=True, slots=True)
class _Steps:
    """The window as columns: prefill tokens, KV usage, whether the step decoded, ms."""

    t: Array
    p: Array
    decoded: NDArray[np.bool_]
    ms: Array

    @classmethod
    def of(cls, samples: Iterable[StepSample]) -> _Steps:
        rows = list(samples)
        return cls(
            np.array([s.prefill_tokens for s in rows], dtype=np.float64),
            np.array([s.kv_usage for s in rows], dtype=np.float64),
            np.array([s.decode_tokens > 0 for s in rows], dtype=np.bool_),
            np.array([s.seconds * 1000.0 for s in rows], dtype=np.float64),
        )

    def subset(self, keep: NDArray[np.bool_]) -> _Steps:
        return _Steps(self.t[keep], self.p[keep], self.decoded[keep], self.ms[keep])

    @property
    def decode_only(self) -> NDArray[np.bool_]:
        only: NDArray[np.bool_] = (self.t == 0) & self.decoded
        return only


class PerfFitter:
    """Collects step samples and fits a sane `PerfModel` from them (see the module doc)."""

    def __init__(self, window: int = 2000, limits: FitLimits | None = None) -> None:
        if window <= 0:
            raise ValueError(f"window must be > 0, got {window}")
        self._samples: deque[StepSample] = deque(maxlen=window)
        self.limits = limits or FitLimits()
        self._good: PerfModel | None = None
        self.rejected: str | None = None  # why the latest fit was not trusted

    def add(self, sample: StepSample) -> None:
        if sample.seconds > 0 and (sample.prefill_tokens > 0 or sample.decode_tokens > 0):
            self._samples.append(sample)

    def __len__(self) -> int:
        return len(self._samples)

    def snapshot(self) -> tuple[StepSample, ...]:
        """The window now, to fit off the thread that adds samples."""
        return tuple(self._samples)

    def fit(self, samples: Iterable[StepSample] | None = None) -> PerfModel | None:
        """A fit of the window (or of `samples`, a snapshot of it) if it is trusted, else the
        last trusted one (None before any). Calls must not overlap."""
        steps = _Steps.of(self._samples if samples is None else samples)
        reason = _thin(steps, self.limits)
        if reason is None:
            flat = bool(np.ptp(steps.p[steps.decoded]) < self.limits.min_usage_span)
            model = _fit(steps, flat)
            reason = _implausible(model, steps, flat, self.limits)
            if reason is None:
                self._good = model
        self.rejected = reason
        if reason is not None:
            log.debug("step-time fit rejected (%s); keeping %s", reason, self._good)
        return self._good


def _thin(steps: _Steps, limits: FitLimits) -> str | None:
    """Why the window cannot pin the model down, or None when it can."""
    sizes = steps.t[steps.t > 0]
    if sizes.size < limits.min_prefill_steps:
        return f"{sizes.size} prefill steps < {limits.min_prefill_steps}"
    n_decode = int(steps.decode_only.sum())
    if n_decode < limits.min_decode_steps:
        return f"{n_decode} decode-only steps < {limits.min_decode_steps}"
    distinct = np.unique(sizes).size
    if distinct < limits.min_prefill_sizes or sizes.max() < limits.min_prefill_ratio * sizes.min():
        return f"prefill sizes too narrow: {distinct} distinct in [{sizes.min():.0f}, {sizes.max():.0f}]"
    return None


def _fit(steps: _Steps, flat: bool) -> PerfModel:
    """Median regression of the relative error under the shape constraints (a level decode when
    `flat`): least absolute deviations by iteratively reweighted constrained least squares."""
    x, y = _design(steps, flat), steps.ms
    weights = 1.0 / y  # first pass: plain least squares of the relative error
    coef = np.zeros(x.shape[1])
    for _ in range(_IRLS_ROUNDS):
        prev, coef = coef, _solve(x, y, weights)
        if np.allclose(coef, prev, rtol=1e-6, atol=0.0):
            break
        # Misses relative to the model's own prediction, so one multiplicative noise weighs
        # alike on a 30 ms and a 600 ms step: weight^2 = 1 / (pred * |pred - y|) turns the
        # squared error into |pred - y| / pred. The floors keep exact rows and zero predictions finite.
        scale = np.maximum(x @ coef, _MIN_SCALE_MS)
        weights = 1.0 / np.sqrt(scale * np.maximum(np.abs(x @ coef - y), _EXACT * scale))
    return _to_model(coef)


def _design(steps: _Steps, flat: bool) -> Array:
    """Columns t^2, t, [t>0], then where the step decoded 1, p - p^2/2, p^2/2 (zero when flat)."""
    t, p = steps.t, steps.p
    dec = steps.decoded.astype(np.float64)
    rising = 0.0 if flat else 1.0
    cols = [t * t, t, (t > 0).astype(np.float64), dec, rising * dec * (p - p * p / 2), rising * dec * p * p / 2]
    return np.column_stack(cols)


def _solve(x: Array, y: Array, weights: Array) -> Array:
    """Coefficients >= 0 minimising sum(weights^2 * (x @ coef - y)^2)."""
    xw = x * weights[:, None]
    norms = np.linalg.norm(xw, axis=0)
    norms[norms == 0] = 1.0  # an all-zero column (flat decode) stays at zero
    coef: Array = nnls(xw / norms, y * weights) / norms  # unit columns: comparable scales for nnls
    return coef


def _to_model(coef: Array) -> PerfModel:
    a, b, c = (float(v) for v in coef[_PREFILL])
    f, u, v = (float(x) for x in coef[_DECODE])
    # No floor: the constraints already keep decode >= f >= 0.
    return PerfModel((a, b, c), ((v - u) / 2, u, f), decode_floor_ms=0.0, speedup_ratio=1.0)


def _implausible(model: PerfModel, steps: _Steps, flat: bool, limits: FitLimits) -> str | None:
    """Why the model misreads the largest prefills or the highest usages seen, or None. A level
    decode claims nothing about a slope, so it is held to all the decode steps instead."""
    sizes = steps.t[steps.t > 0]
    top_prefill = steps.t >= np.quantile(sizes, _TOP_QUANTILE)
    usages = steps.p[steps.decode_only]
    top_usage = steps.decode_only & (steps.p >= (usages.min() if flat else np.quantile(usages, _TOP_QUANTILE)))
    decode_name = "decode steps" if flat else "highest usages"
    for name, rows in (("largest prefills", top_prefill), (decode_name, top_usage)):
        sub = steps.subset(rows)
        predicted = [model.step_ms(int(t), p, d) for t, p, d in zip(sub.t, sub.p, sub.decoded, strict=True)]
        ratio = float(np.median(sub.ms / np.maximum(predicted, 1e-9)))  # 0 predicted: reject
        if not 1.0 / limits.max_error_ratio <= ratio <= limits.max_error_ratio:
            return f"{name}: measured / predicted = {ratio:.2f}"
    return None
