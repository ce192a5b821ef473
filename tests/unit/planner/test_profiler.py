"""The profile fit (the worker's fitter over cell means), fit error, and the profile file."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from lightspeed.planner.profile_sweep import ProfilePoint
from lightspeed.planner.profiler import (
    EngineInfo,
    FitError,
    HostInfo,
    Profile,
    SweepInfo,
    cell_means,
    fit_error,
    fit_points,
    load_perf_model,
    load_profile,
    predicted_ms,
    save_profile,
    statistic_for,
)
from lightspeed.protocol import PerfModel

DYNAMO = PerfModel.dynamo_default()
PREFILL_SIZES = (64, 256, 1024, 2048, 4096, 8192)
USAGES = (0.01, 0.1, 0.25, 0.4, 0.55, 0.7, 0.85, 0.95)


def synthetic_points(model: PerfModel, repeats: int = 3, sizes: tuple[int, ...] = PREFILL_SIZES) -> list[ProfilePoint]:
    """Exact step times of `model` (wall ms) at a sweep's prefill sizes and decode usages."""
    points = [
        ProfilePoint("prefill", t, 0, t, t / 1e6, predicted_ms(model, ProfilePoint("prefill", t, 0, t, 0.0, 0.0)))
        for t in sizes
        for _ in range(repeats)
    ]
    for i, p in enumerate(USAGES):
        ms = model.decode_ms(p) / model.speedup_ratio
        points += [ProfilePoint("decode", 0, 8, 100 * (i + 1), p, ms) for _ in range(repeats)]
    return points


def assert_coeffs(got: PerfModel, want: PerfModel, rel: float) -> None:
    assert got.prefill_coeffs == pytest.approx(want.prefill_coeffs, rel=rel)
    assert got.decode_coeffs == pytest.approx(want.decode_coeffs, rel=rel)
    assert got.speedup_ratio == want.speedup_ratio


def test_fit_of_exact_points_is_dynamos_polynomial() -> None:
    model, rejected = fit_points(synthetic_points(DYNAMO))
    assert rejected is None and model is not None
    assert_coeffs(model, DYNAMO, rel=1e-6)
    assert fit_error(model, synthetic_points(DYNAMO)).prefill_max < 1e-6


def test_fit_at_a_speedup_is_in_reference_ms_with_the_ratio_set() -> None:
    fast = PerfModel.dynamo_default(speedup_ratio=8.0)
    model, _ = fit_points(synthetic_points(fast), speedup_ratio=8.0)
    assert model is not None
    assert_coeffs(model, fast, rel=1e-6)  # same coefficients as the 1x model, speedup 8 on top
    assert model.wall_seconds(model.prefill_ms(1000)) == pytest.approx(DYNAMO.prefill_ms(1000) / 8000)


def test_fit_of_a_convex_model_is_exact() -> None:
    convex = PerfModel((2e-6, 0.5, 20.0), (10.0, 40.0, 30.0), decode_floor_ms=0.0)
    model, _ = fit_points(synthetic_points(convex))
    assert model is not None
    assert_coeffs(model, convex, rel=1e-6)


def test_fit_rejects_a_sweep_the_worker_fitter_cannot_trust() -> None:
    model, rejected = fit_points(synthetic_points(DYNAMO, sizes=(64, 96, 100)))
    assert model is None
    assert rejected == "prefill sizes too narrow: 3 distinct in [64, 100] (one step per sweep cell)"
    model, rejected = fit_points(synthetic_points(DYNAMO, sizes=(64, 128)))
    assert (model, rejected) == (None, "2 prefill steps < 3 (one step per sweep cell)")


def test_cell_means_average_each_cell() -> None:
    # A mocker's timer jitter: 5 / 6 ms by turns, and a late step (30) paid back by short ones.
    cell = [ProfilePoint("decode", 0, 4, 128, 0.1 + 0.01 * i, ms) for i, ms in enumerate((5.0, 6.0, 30.0, 0.5, 1.0))]
    other = ProfilePoint("decode", 0, 4, 256, 0.3, 9.0)
    assert cell_means([*cell, other]) == [ProfilePoint("decode", 0, 4, 128, pytest.approx(0.12), 8.5), other]


def test_a_real_engines_cells_are_medians() -> None:
    assert (statistic_for("mocker"), statistic_for("native")) == ("mean", "median")
    # One 8 s stall among 3.4 s prefills of 2048 tokens (a neighbour on the cores).
    cell = [ProfilePoint("prefill", 2048, 0, 2048, 0.05, ms) for ms in (3405.2, 3398.4, 3372.1, 3708.8, 8267.6)]
    assert cell_means(cell, "median") == [ProfilePoint("prefill", 2048, 0, 2048, 0.05, 3405.2)]
    assert cell_means(cell, "mean")[0].ms == pytest.approx(4430.42)


def test_fit_error_is_relative_per_phase() -> None:
    points = [
        ProfilePoint("prefill", 1000, 0, 1000, 0.0, DYNAMO.prefill_ms(1000) * 1.1),
        ProfilePoint("prefill", 2000, 0, 2000, 0.0, DYNAMO.prefill_ms(2000)),
        ProfilePoint("decode", 0, 1, 10, 0.5, DYNAMO.decode_ms(0.5) / 0.8),
    ]
    err = fit_error(DYNAMO, points)
    assert err.prefill_max == pytest.approx(0.1 / 1.1)
    assert err.prefill_median == pytest.approx(0.1 / 1.1 / 2)
    assert err.decode_median == err.decode_max == pytest.approx(0.2)


def profile(perf: PerfModel | None = DYNAMO, rejected: str | None = None) -> Profile:
    return Profile(
        engine=EngineInfo("mocker", "m", "none", 64, 16384, 256, 8192, 8192, 2.0),
        host=HostInfo("cpu", "avx2 fma", 2),
        sweep=SweepInfo([64, 128, 256], [1, 4], [128], 5, 2, [(4, 9999)]),
        points=synthetic_points(DYNAMO, repeats=1),
        command="lightspeed profile --engine mocker",
        created="2026-01-01T00:00:00+00:00",
        perf=perf,
        fit_error=FitError(0.01, 0.02, 0.03, 0.04) if perf is not None else None,
        fit_rejected=rejected,
        seconds=1.5,
    )


def test_profile_round_trips_through_json(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "model.json"
    save_profile(profile(), path)
    assert load_profile(path) == profile()
    assert load_perf_model(path) == DYNAMO
    body = json.loads(path.read_text())
    assert body["engine"]["num_blocks"] == 16384 and body["host"]["cpu_flags"] == "avx2 fma"
    assert body["sweep"]["skipped_cells"] == [[4, 9999]]
    assert body["perf"]["prefill_coeffs"] == list(DYNAMO.prefill_coeffs)


def test_engine_info_gives_the_planner_its_kv_capacity() -> None:
    assert profile().engine.kv_capacity_tokens == 64 * 16384


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"cannot read profile .*nope\.json: No such file"):
        load_perf_model(tmp_path / "nope.json")


def test_load_not_json(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text("prefill: 1")
    with pytest.raises(ValueError, match=r"p\.json is not a lightspeed profile: JSON is malformed"):
        load_perf_model(path)


def test_load_names_the_bad_field(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    body = msgspec.to_builtins(profile())
    body["perf"]["prefill_coeffs"] = [1.0, 2.0]
    path.write_text(json.dumps(body))
    with pytest.raises(
        ValueError,
        match=r"p\.json is not a lightspeed profile: Expected `array` of length 3 - at `\$\.perf\.prefill_coeffs`",
    ):
        load_perf_model(path)


def test_load_refuses_a_profile_without_a_fit(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    save_profile(profile(perf=None, rejected="3 decode-only steps < 8"), path)
    assert load_profile(path).points  # the measurements are still there
    with pytest.raises(ValueError, match=r"holds no fitted model \(fit rejected: 3 decode-only steps < 8\)"):
        load_perf_model(path)


def test_load_refuses_another_format(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    save_profile(msgspec.structs.replace(profile(), format=7), path)
    with pytest.raises(ValueError, match="profile format 7 is not supported"):
        load_perf_model(path)


def test_load_refuses_a_model_it_cannot_use(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    save_profile(profile(perf=msgspec.structs.replace(DYNAMO, speedup_ratio=0.0)), path)
    with pytest.raises(ValueError, match=r"perf\.speedup_ratio must be > 0, got 0\.0"):
        load_perf_model(path)
    body = json.loads(path.read_text())
    body["perf"]["speedup_ratio"] = 1.0
    body["perf"]["decode_coeffs"][0] = 1e999  # JSON's only way to spell infinity
    path.write_text(json.dumps(body).replace("Infinity", "1e999"))
    with pytest.raises(ValueError, match=r"Number out of range - at `\$\.perf\.decode_coeffs\[0\]`"):
        load_perf_model(path)
