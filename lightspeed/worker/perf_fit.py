"""Fit a worker's step-time model from its own measured steps, for latency-aware routing.

The mocker knows its model exactly; a real engine must measure. Each executed step gives
(prefill tokens t, decode tokens, KV usage p, seconds). We fit the same shape the router
evaluates (`PerfModel`): step_ms = prefill(t) + decode(p) with prefill(t) = a*t^2 + b*t + c for
t > 0 and decode(p) = d*p^2 + e*p + f, by least squares over a sliding window of recent steps.
Until the window holds both kinds of step the fit is not trusted (returns None).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from lightspeed.protocol import PerfModel


@dataclass(frozen=True, slots=True)
class StepSample:
    prefill_tokens: int
    decode_tokens: int
    kv_usage: float
    seconds: float


class PerfFitter:
    def __init__(self, window: int = 2000, min_prefill_steps: int = 8, min_decode_steps: int = 8) -> None:
        if window <= 0:
            raise ValueError(f"window must be > 0, got {window}")
        self._samples: deque[StepSample] = deque(maxlen=window)
        self._min_prefill = min_prefill_steps
        self._min_decode = min_decode_steps

    def add(self, sample: StepSample) -> None:
        if sample.seconds > 0 and (sample.prefill_tokens > 0 or sample.decode_tokens > 0):
            self._samples.append(sample)

    def __len__(self) -> int:
        return len(self._samples)

    def fit(self) -> PerfModel | None:
        """Least-squares model of the window, or None while it lacks prefill or decode steps."""
        rows = list(self._samples)
        n_prefill = sum(1 for s in rows if s.prefill_tokens > 0)
        n_decode = sum(1 for s in rows if s.prefill_tokens == 0)
        if n_prefill < self._min_prefill or n_decode < self._min_decode:
            return None
        t = np.array([s.prefill_tokens for s in rows], dtype=np.float64)
        p = np.array([s.kv_usage for s in rows], dtype=np.float64)
        has_prefill = (t > 0).astype(np.float64)
        has_decode = np.array([1.0 if s.decode_tokens > 0 else 0.0 for s in rows])
        y = np.array([s.seconds * 1000.0 for s in rows])
        # Columns: a*t^2, b*t, c*[t>0], d*p^2, e*p, f  (decode terms only where decode ran).
        x = np.column_stack([t * t, t, has_prefill, has_decode * p * p, has_decode * p, has_decode])
        coef, *_ = np.linalg.lstsq(x, y, rcond=None)
        a, b, c, d, e, f = (float(v) for v in coef)
        # The floor keeps a noisy quadratic from predicting a near-zero decode step: no decode
        # step is faster than the fastest one seen.
        floor = float(max(1e-3, y[t == 0].min()))
        # A negative prefill slope or intercept is noise in a small window: clamp to monotone.
        return PerfModel((max(0.0, a), max(1e-6, b), max(0.0, c)), (d, e, f), floor, 1.0)
