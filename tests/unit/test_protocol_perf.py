"""PerfModel: the one step-time model the mocker, the router and the worker's fit share."""

from __future__ import annotations

import msgspec
import pytest

from lightspeed.protocol import DEFAULT_PERF_MODEL, PerfModel

LINEAR = PerfModel((0.0, 0.01, 10.0), (0.0, 0.0, 2.0), 1.0, 4.0)  # prefill 10 ms + 10 µs/token


def test_default_is_dynamos_fit() -> None:
    assert DEFAULT_PERF_MODEL.prefill_coeffs == (4.209989e-7, 1.518344e-2, 16.50142)
    assert DEFAULT_PERF_MODEL.decode_coeffs == (-25.74, 54.01, 5.74)
    assert (DEFAULT_PERF_MODEL.decode_floor_ms, DEFAULT_PERF_MODEL.speedup_ratio) == (1.0, 1.0)
    assert PerfModel.dynamo_default() == DEFAULT_PERF_MODEL
    fast = PerfModel.dynamo_default(speedup_ratio=2.5)
    assert fast.speedup_ratio == 2.5 and fast.prefill_coeffs == DEFAULT_PERF_MODEL.prefill_coeffs


def test_prefill_polynomial() -> None:
    perf = DEFAULT_PERF_MODEL
    assert perf.prefill_ms(0) == 0.0 and perf.prefill_ms(-3) == 0.0
    assert perf.prefill_ms(1) == pytest.approx(4.209989e-7 + 1.518344e-2 + 16.50142)
    assert perf.prefill_ms(1000) == pytest.approx(32.1058589)
    assert LINEAR.prefill_ms(500) == pytest.approx(15.0)


def test_decode_polynomial_and_floor() -> None:
    perf = DEFAULT_PERF_MODEL
    assert perf.decode_ms(0.0) == pytest.approx(5.74)
    assert perf.decode_ms(0.5) == pytest.approx(26.31)
    assert perf.decode_ms(1.0) == pytest.approx(34.01)
    assert perf.decode_ms(-1.0) == 1.0  # -25.74 - 54.01 + 5.74 is below the floor
    assert PerfModel((0.0, 0.0, 0.0), (0.0, 0.0, 0.5), decode_floor_ms=0.0).decode_ms(0.3) == 0.5


def test_step_is_prefill_then_decode_when_the_step_decodes() -> None:
    assert LINEAR.step_ms(0, 0.5, has_decode=False) == 0.0
    assert LINEAR.step_ms(0, 0.5, has_decode=True) == pytest.approx(2.0)
    assert LINEAR.step_ms(500, 0.5, has_decode=False) == pytest.approx(15.0)
    assert LINEAR.step_ms(500, 0.5, has_decode=True) == pytest.approx(17.0)


def test_wall_seconds_divide_by_the_speedup() -> None:
    assert LINEAR.wall_seconds(LINEAR.step_ms(500, 0.5, True)) == pytest.approx(0.00425)
    assert DEFAULT_PERF_MODEL.wall_seconds(1000.0) == 1.0


def test_survives_the_wire() -> None:
    wire = msgspec.msgpack.encode(LINEAR)
    back = msgspec.msgpack.decode(wire, type=PerfModel)
    assert back == LINEAR and back.step_ms(500, 0.5, True) == LINEAR.step_ms(500, 0.5, True)
