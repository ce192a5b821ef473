import pytest

from lightspeed.mocker.timing import MockerTiming
from lightspeed.protocol import DEFAULT_PERF_MODEL, PerfModel


def test_prefill_polynomial_values() -> None:
    assert DEFAULT_PERF_MODEL.prefill_ms(0) == 0.0
    assert DEFAULT_PERF_MODEL.prefill_ms(1) == pytest.approx(4.209989e-7 + 1.518344e-2 + 16.50142)
    assert DEFAULT_PERF_MODEL.prefill_ms(1000) == pytest.approx(32.1058589)
    assert DEFAULT_PERF_MODEL.prefill_ms(8192) == pytest.approx(4.209989e-7 * 8192**2 + 1.518344e-2 * 8192 + 16.50142)


def test_decode_polynomial_values_and_floor() -> None:
    assert DEFAULT_PERF_MODEL.decode_ms(0.0) == pytest.approx(5.74)
    assert DEFAULT_PERF_MODEL.decode_ms(0.5) == pytest.approx(26.31)
    assert DEFAULT_PERF_MODEL.decode_ms(1.0) == pytest.approx(34.01)
    assert DEFAULT_PERF_MODEL.decode_ms(-1.0) == 1.0  # floor: -25.74 - 54.01 + 5.74 < 1


def test_step_combines_prefill_then_decode() -> None:
    timing = MockerTiming()
    assert timing.step_seconds(0, 0.5, has_decode=False) == 0.0
    assert timing.step_seconds(1000, 0.5, has_decode=False) == pytest.approx(0.0321058589)
    assert timing.step_seconds(0, 0.5, has_decode=True) == pytest.approx(0.02631)
    assert timing.step_seconds(1000, 0.5, has_decode=True) == pytest.approx(0.0321058589 + 0.02631)


def test_speedup_divides_time() -> None:
    assert MockerTiming(10.0).step_seconds(1000, 0.5, True) == pytest.approx(0.00584158589)
    assert MockerTiming(1e6).step_seconds(0, 0.0, True) == pytest.approx(5.74e-9)
    with pytest.raises(ValueError):
        MockerTiming(0.0)


def test_phases_split_the_step() -> None:
    timing = MockerTiming(10.0)
    assert timing.phase_seconds(1000, 0.5, True) == pytest.approx((0.00321058589, 0.002631))
    assert timing.phase_seconds(1000, 0.5, False) == pytest.approx((0.00321058589, 0.0))
    assert timing.phase_seconds(0, 0.0, True) == pytest.approx((0.0, 0.000574))
    assert sum(timing.phase_seconds(1000, 0.5, True)) == pytest.approx(timing.step_seconds(1000, 0.5, True))


def test_the_mocker_runs_the_shared_perf_model() -> None:
    timing = MockerTiming(4.0)
    assert timing.perf == PerfModel.dynamo_default(4.0)
    for t, p, dec in ((0, 0.3, True), (777, 0.9, False), (5000, 0.1, True)):
        assert timing.step_seconds(t, p, dec) == timing.perf.wall_seconds(timing.perf.step_ms(t, p, dec))
