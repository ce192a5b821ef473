"""`lightspeed replay` end to end on a tiny Azure CSV: flags, report.json, timeline.png."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from lightspeed.cli import main as lightspeed_main
from lightspeed.sim.cli import add_replay_args, config_from_args

CSV = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:15:46.000,300,4
2023-11-16 18:15:46.500,200,3
2023-11-16 18:15:47.000,9000,2
2023-11-16 18:15:49.000,100,5
"""


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_replay_args(parser)
    return parser.parse_args(argv)


def test_flags_bind_to_a_validated_config() -> None:
    cfg = config_from_args(
        _parse(
            [
                "--trace",
                "t.csv",
                "--workers",
                "3",
                "--router-mode",
                "kv-latency",
                "--planner",
                "throughput",
                "--predictor",
                "kalman",
                "--max-workers",
                "6",
            ]
        )
    )
    assert (cfg.fleet.workers, cfg.fleet.router_mode) == (3, "kv-latency")
    assert (cfg.planner.mode, cfg.planner.predictor, cfg.planner.max_workers) == ("throughput", "kalman", 6)
    with pytest.raises(ValueError, match="speedup"):
        config_from_args(_parse(["--trace", "t.csv", "--speedup", "0"]))


def test_replay_writes_the_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "t.csv"
    trace.write_text(CSV)
    out = tmp_path / "out"
    code = lightspeed_main(["replay", "--trace", str(trace), "--workers", "2", "--no-progress", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    summary = report["summary"]
    # The 9000-token prompt is over max_model_len 8192: refused with 400, as a live worker does.
    assert (summary["requests"], summary["completed"], summary["failures"]) == (4, 3, {"http_400": 1})
    assert summary["total_output_tokens"] == 4 + 3 + 5
    assert report["worker_seconds"] == pytest.approx(2 * report["virtual_seconds"])
    assert (out / "timeline.png").stat().st_size > 0
    assert "SLA (TTFT <= 2 s" in capsys.readouterr().out


def test_missing_trace_is_a_configuration_error(tmp_path: Path) -> None:
    assert lightspeed_main(["replay", "--trace", str(tmp_path / "none.csv"), "--no-progress"]) == 2
    assert lightspeed_main(["replay", "--no-progress"]) == 2
