"""Replay configuration is validated up front, naming the bad field."""

from __future__ import annotations

import pytest

from lightspeed.sim.config import FleetConfig, PlannerSettings, ReplayConfig, TraceSlice


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"path": ""}, "trace"),
        ({"path": "t.csv", "fmt": "parquet"}, "trace_format"),
        ({"path": "t.csv", "speedup": 0.0}, "speedup"),
        ({"path": "t.csv", "start_s": -1.0}, "trace_start"),
        ({"path": "t.csv", "window_s": float("nan")}, "window_s"),
        ({"path": "t.csv", "num_requests": 0}, "num_requests"),
    ],
)
def test_trace_slice_rejects(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        TraceSlice(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"workers": 0}, "workers"),
        ({"speedup_ratio": -2.0}, "speedup_ratio"),
        ({"router_mode": "direct"}, "router_mode"),
    ],
)
def test_fleet_rejects(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        FleetConfig(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"mode": "magic"}, "planner"),
        ({"predictor": "oracle"}, "predictor"),
        ({"ttft_slo_s": 0.0}, "ttft_slo_s"),
        ({"start_delay_s": -1.0}, "worker_start_delay"),
        ({"min_workers": 3, "max_workers": 2}, "max_workers"),
    ],
)
def test_planner_rejects(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        PlannerSettings(**kwargs)  # type: ignore[arg-type]


def test_initial_fleet_must_fit_the_planner_budget() -> None:
    with pytest.raises(ValueError, match="workers"):
        ReplayConfig(TraceSlice("t.csv"), FleetConfig(workers=5), PlannerSettings(mode="load", max_workers=4))
    ReplayConfig(TraceSlice("t.csv"), FleetConfig(workers=5), PlannerSettings(mode="off", max_workers=4))
