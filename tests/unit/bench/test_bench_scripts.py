"""Cheap self-check of the comparison scripts in bench/: each imports, builds its flags through the
shared harness `main()` (`--help`), parses its defaults into valid Params, and the harness's result
writer records the command and the hardware next to the payload. No benchmark runs here."""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import msgspec
import pytest

BENCH = Path(__file__).resolve().parents[3] / "bench"
SCRIPTS = (
    "calibration_matrix",
    "frontend_overhead",
    "native_vs_vllm",
    "prefix_cache_ttft",
    "router_micro",
    "routing_quality",
    "rss_soak",
)
# One flag of each script's own (not a Params field), to see its add_flags ran.
OWN_FLAG = {
    "calibration_matrix": "--kv-workloads",
    "frontend_overhead": "--connections",
    "native_vs_vllm": "--vllm-venv",
    "prefix_cache_ttft": "--prompt-len",
    "router_micro": "--smoke",
    "routing_quality": "--policies",
    "rss_soak": "--name",
}


@pytest.fixture(scope="module")
def bench_path() -> Iterator[None]:
    """bench/ on sys.path, as when a script runs as `python bench/NAME.py` (`import harness`)."""
    sys.path.insert(0, str(BENCH))
    try:
        yield
    finally:
        sys.path.remove(str(BENCH))


def _load(name: str) -> ModuleType:
    return importlib.import_module(name)


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_help(name: str, bench_path: None, capsys: pytest.CaptureFixture[str]) -> None:
    module = _load(name)
    assert module.SCRIPT.name == name
    with pytest.raises(SystemExit) as exit_info:
        module.main(module.SCRIPT, ["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--out", "--log-level", OWN_FLAG[name]):
        assert flag in text


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_defaults_parse(name: str, bench_path: None) -> None:
    """Defaults give valid Params and a result file in bench/results/ named as before."""
    harness = _load("harness")
    script = _load(name).SCRIPT
    args, params = harness.parse(script, [])
    assert isinstance(params, script.params)
    path = harness.output_path(script, args)
    assert path == harness.RESULTS / f"{name}.json"


def test_out_folder_or_file(bench_path: None, tmp_path: Path) -> None:
    harness = _load("harness")
    script = _load("frontend_overhead").SCRIPT
    args, _ = harness.parse(script, ["--only", "dynamo", "--out", str(tmp_path)])
    assert harness.output_path(script, args) == tmp_path / "frontend_overhead_dynamo.json"
    args, _ = harness.parse(script, ["--out", str(tmp_path / "x.json")])
    assert harness.output_path(script, args) == tmp_path / "x.json"


def test_usage_errors_exit_2(bench_path: None) -> None:
    harness = _load("harness")
    for name, argv in (
        ("frontend_overhead", ["--connections", "pigeon"]),
        ("routing_quality", ["--policies", "nope"]),
        ("calibration_matrix", ["--policies", "ls-rr,nope"]),
        ("calibration_matrix", ["--design", "diagonal"]),
        ("calibration_matrix", ["--cells", "mooncake:4:2"]),
        ("calibration_matrix", ["--workloads", "sharegpt"]),
        ("router_micro", ["--workers", "0"]),
    ):
        with pytest.raises(SystemExit) as exit_info:
            harness.parse(_load(name).SCRIPT, argv)
        assert exit_info.value.code == 2


def test_router_micro_smoke_scale(bench_path: None) -> None:
    harness = _load("harness")
    script = _load("router_micro").SCRIPT
    args, params = harness.parse(script, ["--smoke", "--blocks", "5"])
    assert params.blocks == 20_000 and params.workers == 8  # --smoke wins, as before
    assert harness.output_path(script, args) == harness.WORK / "router_micro_smoke.json"


class _Payload(msgspec.Struct):
    value: int
    label: str


def test_write_result(bench_path: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    harness = _load("harness")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE")
    path = tmp_path / "sub" / "r.json"
    harness.write_result(_Payload(3, "x"), path, started_at="2026-01-01T00:00:00+00:00")
    doc: dict[str, Any] = json.loads(path.read_text())
    assert list(doc)[:4] == ["command", "started_at", "finished_at", "machine"]
    assert doc["value"] == 3 and doc["label"] == "x"
    assert doc["command"].split()[0] and doc["started_at"] == "2026-01-01T00:00:00+00:00"
    machine = doc["machine"]
    assert machine["cpu"] and isinstance(machine["cpu_flags"], str)
    assert machine["isa_env"]["ONEDNN_MAX_CPU_ISA"] == "AVX512_CORE"
    assert machine["cpus"] >= 1


def test_write_result_rejects_clashes(bench_path: None, tmp_path: Path) -> None:
    harness = _load("harness")
    with pytest.raises(ValueError, match="command"):
        harness.write_result({"command": "mine"}, tmp_path / "r.json")
    with pytest.raises(TypeError):
        harness.write_result([1, 2], tmp_path / "r.json")


def test_cpu_info(bench_path: None, tmp_path: Path) -> None:
    harness = _load("harness")
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu avx512f amx_tile\n\n"
        "processor\t: 1\nmodel name\t: Test CPU\nflags\t\t: fpu avx512f amx_tile\n"
    )
    assert harness.cpu_info(cpuinfo) == {"model": "Test CPU", "flags": "fpu avx512f amx_tile"}
    assert harness.cpu_info(tmp_path / "missing") == {"model": "unknown", "flags": ""}


def test_calibration_star_design(bench_path: None) -> None:
    harness = _load("harness")
    module = _load("calibration_matrix")
    _, params = harness.parse(module.SCRIPT, ["--workloads", "mooncake,azure-conv"])
    got = [(c.workload, c.workers, c.speedup, c.load) for c in module.cells(params)]
    star = [(4, 2.0, 0.3), (4, 2.0, 0.6), (4, 2.0, 0.9), (2, 2.0, 0.6), (8, 2.0, 0.6), (4, 1.0, 0.6), (4, 4.0, 0.6)]
    assert got == [("mooncake", *c) for c in star] + [("azure-conv", *c) for c in star]
    _, full = harness.parse(module.SCRIPT, ["--workloads", "mooncake", "--design", "full"])
    assert len(module.cells(full)) == 27
    _, picked = harness.parse(module.SCRIPT, ["--cells", "azure-conv:8:2:0.6,multiturn:4:4:0.6"])
    assert [c.label for c in module.cells(picked)] == ["azure-conv w8 s2 l0.6", "multiturn w4 s4 l0.6"]


def test_calibration_capacity_arithmetic(bench_path: None) -> None:
    module = _load("calibration_matrix")
    params = module.Params()
    step_s = (4.209989e-7 * 8192**2 + 1.518344e-2 * 8192 + 16.50142 + (-25.74 * 0.09 + 54.01 * 0.3 + 5.74)) / 1000
    long_prompts = module.WorkloadStats(100, 50.0, 16384.0, 10.0, 2.0)  # prefill-bound
    assert module.capacity_rps(params, long_prompts, 2, 4.0) == pytest.approx(8192 / step_s / 16384 * 8)
    long_outputs = module.WorkloadStats(100, 50.0, 100.0, 500.0, 2.0)  # bound by 256 sequences
    assert module.capacity_rps(params, long_outputs, 1, 1.0) == pytest.approx(256 / (500 * step_s))
