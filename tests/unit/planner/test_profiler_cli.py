"""`lightspeed profile` from the command line: flags, files written, exit codes."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from lightspeed.cli import build_parser, main
from lightspeed.engine.config import EngineConfig
from lightspeed.planner.profile_cli import SWEEP_FLAGS, parse_sizes, sweep_spec
from lightspeed.planner.profiler import load_perf_model, load_profile

FAST = ["--engine", "mocker", "--speedup-ratio", "2", "--num-gpu-blocks", "512", "--no-progress"]
TINY = ["--prefill-sizes", "256,1024,4096", "--batch-sizes", "1,8", "--context-lens", "64,256", "--repeats", "3"]


def sweep_values(**kw: object) -> dict[str, object]:
    values: dict[str, object] = {s.dest: s.default for s in SWEEP_FLAGS}
    return {**values, **kw}


def test_parse_sizes() -> None:
    assert parse_sizes("prefill_sizes", "64, 128,256,") == (64, 128, 256)
    assert parse_sizes("batch_sizes", "") == ()
    with pytest.raises(ValueError, match=r"--context-lens must be comma-separated integers, got '1k'"):
        parse_sizes("context_lens", "1k")


def test_sweep_spec_fills_what_the_flags_leave_out() -> None:
    cfg = EngineConfig()
    spec = sweep_spec(sweep_values(batch_sizes="2,6", repeats=4, warmup=0), cfg)
    assert spec.batch_sizes == (2, 6)
    assert spec.prefill_sizes == (64, 128, 256, 512, 1024, 2048, 4096, 8192)
    assert spec.context_lens == (230, 921, 1843, 2764, 3686)
    assert (spec.repeats, spec.warmup) == (4, 0)
    with pytest.raises(ValueError, match="--prefill-sizes names no sizes"):
        sweep_spec(sweep_values(prefill_sizes=" , "), cfg)


def test_profile_is_a_subcommand_with_the_worker_engine_flags() -> None:
    assert build_parser().parse_args(["profile"]).command == "profile"
    sub = build_parser()._subparsers._group_actions[0].choices["profile"]  # type: ignore[union-attr]
    flags = {opt for action in sub._actions for opt in action.option_strings}
    for flag in ("--engine", "--model", "--dtype", "--block-size", "--num-gpu-blocks", "--max-num-seqs"):
        assert flag in flags
    for flag in ("--max-num-batched-tokens", "--speedup-ratio", "--prefill-sizes", "--batch-sizes"):
        assert flag in flags
    for flag in ("--context-lens", "--repeats", "--warmup", "--out", "--plot", "--log-level"):
        assert flag in flags
    assert "--worker-port" not in flags and "--discovery" not in flags  # serving flags stay out


def test_profile_mocker_writes_model_points_and_plot(tmp_path: Path) -> None:
    out = tmp_path / "model.json"
    assert main(["profile", *FAST, *TINY, "--out", str(out)]) == 0
    body = json.loads(out.read_text())
    assert body["engine"] == {
        "engine": "mocker",
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "dtype": "none",
        "block_size": 64,
        "num_blocks": 512,
        "max_num_seqs": 256,
        "max_num_batched_tokens": 8192,
        "max_model_len": 8192,
        "speedup_ratio": 2.0,
    }
    assert body["sweep"] == {
        "prefill_sizes": [256, 1024, 4096],
        "batch_sizes": [1, 8],
        "context_lens": [64, 256],
        "repeats": 3,
        "warmup": 2,
        "skipped_cells": [],
    }
    assert len(body["points"]) == (3 + 4) * 3
    assert body["cell_statistic"] == "mean" and body["fit_rejected"] is None
    assert body["command"] == (
        "lightspeed profile --engine mocker --num-gpu-blocks 512 --speedup-ratio 2.0 --prefill-sizes 256,1024,4096 "
        f"--batch-sizes 1,8 --context-lens 64,256 --repeats 3 --warmup 2 --out {out}"
    )
    assert body["host"]["cpus"] >= 1 and body["host"]["cpu_model"] and len(body["host"]["loadavg_at_end"]) == 3
    perf = load_perf_model(out)
    assert perf.speedup_ratio == 2.0
    assert perf.prefill_ms(4096) == pytest.approx(85.99, rel=0.15)  # Dynamo's prefill(4096), reference ms
    assert (tmp_path / "model.png").stat().st_size > 10_000


def test_plot_none_and_an_explicit_plot_path(tmp_path: Path) -> None:
    out = tmp_path / "a.json"
    assert main(["profile", *FAST, *TINY, "--repeats", "2", "--warmup", "1", "--out", str(out), "--plot", "none"]) == 0
    assert not (tmp_path / "a.png").exists()
    png = tmp_path / "plots" / "b.png"
    assert (
        main(["profile", *FAST, *TINY, "--repeats", "2", "--warmup", "1", "--out", str(out), "--plot", str(png)]) == 0
    )
    assert png.stat().st_size > 10_000


def test_a_rejected_fit_exits_1_and_keeps_the_points(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "p.json"
    narrow = ["--prefill-sizes", "64,96,100", "--batch-sizes", "1,8", "--context-lens", "64,256", "--repeats", "1"]
    with caplog.at_level(logging.ERROR):
        assert main(["profile", *FAST, *narrow, "--warmup", "0", "--out", str(out), "--plot", "none"]) == 1
    assert "fit rejected: prefill sizes too narrow: 3 distinct in [64, 100]" in caplog.text
    assert len(load_profile(out).points) == 7
    with pytest.raises(ValueError, match="holds no fitted model"):
        load_perf_model(out)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--prefill-sizes", "0,64"], "prefill_sizes must hold positive integers, got [0, 64]"),
        (["--prefill-sizes", "9000"], "prefill size 9000 exceeds max_num_batched_tokens=8192"),
        (["--batch-sizes", "x"], "--batch-sizes must be comma-separated integers"),
        (["--repeats", "0"], "repeats must be an integer >= 1, got 0"),
        (["--block-size", "0"], "block_size must be"),
    ],
)
def test_bad_flags_exit_2_naming_the_problem(
    flags: list[str], message: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "p.json"
    with caplog.at_level(logging.ERROR):
        assert main(["profile", *FAST, *flags, "--out", str(out)]) == 2
    assert message in caplog.text
    assert not out.exists()


def test_sweep_flags_read_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("LIGHTSPEED_PREFILL_SIZES", "9000")
    with caplog.at_level(logging.ERROR):
        assert main(["profile", *FAST, "--out", str(tmp_path / "p.json")]) == 2
    assert "prefill size 9000 exceeds max_num_batched_tokens=8192" in caplog.text


def test_help_renders(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["profile", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "--prefill-sizes" in text and "~6%, 23%, 45%, 68%, 90% of the" in text
