from __future__ import annotations

import random

import pytest

from lightspeed.mocker.timing import MockerTiming
from lightspeed.router.cost import _decode_ms, _prefill_ms
from lightspeed.worker.perf_fit import PerfFitter, StepSample


def test_recovers_the_mocker_model_from_its_steps() -> None:
    timing = MockerTiming(1.0)
    rng = random.Random(0)
    fitter = PerfFitter()
    for _ in range(400):
        t = rng.choice([0, 0, rng.randrange(1, 8192)])
        p = rng.random()
        decode = 0 if t and rng.random() < 0.3 else 8
        fitter.add(StepSample(t, decode, p, timing.step_seconds(t, p, has_decode=decode > 0)))
    perf = fitter.fit()
    assert perf is not None
    for t in (100, 2000, 8000):
        assert _prefill_ms(perf, t) == pytest.approx(timing.step_ms_unscaled(t, 0.5, False), rel=0.02)
    for p in (0.1, 0.5, 0.9):
        assert _decode_ms(perf, p) == pytest.approx(timing.step_ms_unscaled(0, p, True), rel=0.02)


def test_no_fit_until_both_kinds_of_step_are_seen() -> None:
    fitter = PerfFitter(min_prefill_steps=2, min_decode_steps=2)
    fitter.add(StepSample(100, 0, 0.1, 0.05))
    fitter.add(StepSample(200, 0, 0.1, 0.06))
    fitter.add(StepSample(0, 0, 0.1, 0.0))  # an empty step is ignored
    assert fitter.fit() is None and len(fitter) == 2
    with pytest.raises(ValueError):
        PerfFitter(window=0)
