"""`lightspeed profile`: sweep one engine, fit its step-time model, write JSON + PNG.

The engine flags are the worker's own (same names, help and `LIGHTSPEED_<FLAG>` variables, built
from `WorkerConfig`), and the engine is built by the worker's factory, so the profile measures
exactly what `lightspeed worker` with those flags would run. Sweep flags take comma-separated
integers; left out, they are derived from the engine's limits (profile_sweep.default_spec).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lightspeed.config import CONFIG_ERROR_EXIT, ConfigError, WorkerConfig
from lightspeed.engine.config import EngineConfig
from lightspeed.options import FlagSpec, add_flags, build_config, flag_specs, resolve
from lightspeed.planner.profile_sweep import ProfilePoint, SweepRunner, SweepSpec, default_spec
from lightspeed.planner.profiler import (
    EngineInfo,
    HostInfo,
    Profile,
    SweepInfo,
    fit_error,
    fit_points,
    save_profile,
    statistic_for,
)

log = logging.getLogger(__name__)

# The worker flags that shape the engine (the rest are about planes and serving).
ENGINE_FIELDS = (
    "engine",
    "model",
    "dtype",
    "block_size",
    "num_gpu_blocks",
    "max_num_seqs",
    "max_num_batched_tokens",
    "max_model_len",
    "speedup_ratio",
    "kv_cache_gb",
    "seed",
)


def _spec(flag: str, hint: Any, default: Any, help_: str) -> FlagSpec:
    return FlagSpec(flag, ((flag[2:].replace("-", "_"),),), hint, default, help_)


SWEEP_FLAGS = (
    _spec(
        "--prefill-sizes",
        str,
        "",
        "uncached prompt tokens per prefill step, comma-separated ('' = 64, 128, ... up to the step budget)",
    ),
    _spec("--batch-sizes", str, "", "decode batch sizes, comma-separated ('' = 1, 4, 16, ... up to max-num-seqs)"),
    _spec(
        "--context-lens",
        str,
        "",
        "decode context lengths in tokens, comma-separated ('' = the largest batch at ~6%%, 23%%, 45%%, 68%%, 90%% of the KV cache)",
    ),
    _spec("--repeats", int, 5, "measured steps per sweep point"),
    _spec("--warmup", int, 2, "unrecorded steps before each sweep point's measured ones"),
    _spec("--out", str, "profile.json", "where to write the profile (JSON: the fitted model and every measured point)"),
    _spec("--plot", str, "", "PNG of measured points vs the fit ('' = --out with .png; 'none' = no plot)"),
    _spec("--progress", bool, True, "show a progress bar"),
)


def engine_specs() -> tuple[FlagSpec, ...]:
    return tuple(s for s in flag_specs(WorkerConfig) if s.dest in ENGINE_FIELDS)


def add_profile_args(parser: argparse.ArgumentParser) -> None:
    add_flags(parser, [*engine_specs(), *SWEEP_FLAGS])


def profile_main(args: argparse.Namespace) -> int:
    """Run the profile; 0 on a trusted fit, 1 when the fit was rejected (the points are still
    written), CONFIG_ERROR_EXIT on a bad flag or sweep."""
    try:
        cfg, values = _resolve(args)
        return _run(cfg, values)
    except (ValueError, ConfigError) as err:
        log.error("profile: %s", err)
        return CONFIG_ERROR_EXIT


def _resolve(args: argparse.Namespace) -> tuple[WorkerConfig, dict[str, Any]]:
    specs = engine_specs()
    values = resolve([*specs, *SWEEP_FLAGS], vars(args), os.environ, {})
    cfg = build_config(WorkerConfig, specs, values)
    return cfg, {s.dest: values.get(s.dest, s.default) for s in SWEEP_FLAGS}


def parse_sizes(name: str, raw: str) -> tuple[int, ...]:
    """'64,128, 256' -> (64, 128, 256); ValueError naming the flag on anything else."""
    try:
        return tuple(int(part) for part in raw.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"--{name.replace('_', '-')} must be comma-separated integers, got {raw!r}") from None


def sweep_spec(values: dict[str, Any], ecfg: EngineConfig) -> SweepSpec:
    """The sweep the flags name, with each list left out taken from the engine's defaults."""
    base = default_spec(ecfg, values["repeats"], values["warmup"])
    given = {name: parse_sizes(name, values[name]) for name in ("prefill_sizes", "batch_sizes", "context_lens")}
    for name, sizes in given.items():
        if values[name].strip() and not sizes:
            raise ValueError(f"--{name.replace('_', '-')} names no sizes")
    return SweepSpec(
        given["prefill_sizes"] or base.prefill_sizes,
        given["batch_sizes"] or base.batch_sizes,
        given["context_lens"] or base.context_lens,
        base.repeats,
        base.warmup,
    )


def _run(cfg: WorkerConfig, values: dict[str, Any]) -> int:
    import uvloop

    from lightspeed.worker.factory import build_engine

    out = Path(values["out"])
    SweepSpec((1,), (1,), (1,), values["repeats"], values["warmup"])  # bad counts fail before the model loads
    built = build_engine(cfg)
    try:
        spec = sweep_spec(values, built.core.config)
        runner = SweepRunner(built.core, spec, seed=cfg.seed)
        points, seconds = uvloop.run(_sweep(runner, values["progress"]))
    finally:
        built.close()
    command = command_line(cfg, spec, values)
    profile = _profile(cfg, built.core.config, _dtype_of(built.core), runner, points, seconds, command)
    save_profile(profile, out)
    _plot(profile, out, values["plot"])
    _log_summary(profile, out)
    return 0 if profile.perf is not None else 1


async def _sweep(runner: SweepRunner, progress: bool) -> tuple[list[ProfilePoint], float]:
    from tqdm import tqdm

    for cell in runner.skipped:
        log.warning("skipping decode cell B=%d L=%d: over the KV cache", cell.batch_size, cell.context_len)
    started = time.perf_counter()
    with tqdm(total=runner.total_steps, disable=not progress, unit="step", desc="profile", mininterval=0.5) as bar:
        points = await runner.run(bar.update)
    return points, time.perf_counter() - started


def _profile(
    cfg: WorkerConfig,
    ecfg: EngineConfig,
    dtype: str,
    runner: SweepRunner,
    points: list[ProfilePoint],
    seconds: float,
    command: str,
) -> Profile:
    statistic = statistic_for(cfg.engine)
    model, rejected = fit_points(points, cfg.speedup_ratio if cfg.engine == "mocker" else 1.0, statistic)
    spec = runner.spec
    sweep = SweepInfo(
        list(spec.prefill_sizes),
        list(spec.batch_sizes),
        list(spec.context_lens),
        spec.repeats,
        spec.warmup,
        [(c.batch_size, c.context_len) for c in runner.skipped],
    )
    return Profile(
        engine=_engine_info(cfg, ecfg, dtype),
        host=host_info(),
        sweep=sweep,
        points=points,
        command=command,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        perf=model,
        fit_error=fit_error(model, points, statistic) if model is not None else None,
        fit_rejected=rejected,
        seconds=round(seconds, 3),
        cell_statistic=statistic,
    )


def _engine_info(cfg: WorkerConfig, ecfg: EngineConfig, dtype: str) -> EngineInfo:
    from lightspeed.models.registry import resolve_model

    return EngineInfo(
        engine=cfg.engine,
        model=resolve_model(cfg.model or None).served_name,
        dtype=dtype,
        block_size=ecfg.block_size,
        num_blocks=ecfg.num_gpu_blocks,
        max_num_seqs=ecfg.max_num_seqs,
        max_num_batched_tokens=ecfg.max_num_batched_tokens,
        max_model_len=ecfg.max_model_len,
        speedup_ratio=cfg.speedup_ratio if cfg.engine == "mocker" else 1.0,
    )


def _dtype_of(core: Any) -> str:
    """The dtype the native runner settled on ('auto' resolved); the mocker has none."""
    runner = getattr(core.executor, "runner", None)
    dtype = getattr(runner, "dtype", None)
    return str(dtype).removeprefix("torch.") if dtype is not None else "none"


def host_info() -> HostInfo:
    from lightspeed.native.cpu_caps import cpuinfo_fields

    try:
        model, flags = cpuinfo_fields(Path("/proc/cpuinfo").read_text())
    except OSError:
        model, flags = "", ""
    load = os.getloadavg()
    return HostInfo(model or "unknown", flags, len(os.sched_getaffinity(0)), (load[0], load[1], load[2]))


def command_line(cfg: WorkerConfig, spec: SweepSpec, values: dict[str, Any]) -> str:
    """The command that makes this profile again: every engine flag off its default and the
    whole sweep spelled out (environment and derived defaults included). Under the `flock`
    bench lock, the parent's command line as run (as bench/harness.py records it)."""
    words = ["lightspeed", "profile"]
    for s in engine_specs():
        value = getattr(cfg, s.dest)
        if value != s.default:
            words += [s.flag, str(value)]
    for name in ("prefill_sizes", "batch_sizes", "context_lens"):
        words += ["--" + name.replace("_", "-"), ",".join(map(str, getattr(spec, name)))]
    words += ["--repeats", str(spec.repeats), "--warmup", str(spec.warmup), "--out", str(values["out"])]
    if values["plot"]:
        words += ["--plot", str(values["plot"])]
    own = shlex.join(words)
    try:
        parent = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().split(b"\0")[:-1]
    except OSError:
        return own
    run = [w.decode(errors="replace") for w in parent]
    return shlex.join(run) if run and Path(run[0]).name == "flock" else own


def _plot(profile: Profile, out: Path, plot: str) -> None:
    if plot.lower() == "none":
        return
    from lightspeed.planner.profile_plot import write_plot

    path = Path(plot) if plot else out.with_suffix(".png")
    if write_plot(profile, path):
        log.info("wrote %s", path)


def _log_summary(profile: Profile, out: Path) -> None:
    model, err = profile.perf, profile.fit_error
    log.info("wrote %s (%d points in %.1f s)", out, len(profile.points), profile.seconds)
    if model is None or err is None:
        log.error("fit rejected: %s", profile.fit_rejected)
        return
    log.info(
        "prefill(t) = %.4g t^2 + %.4g t + %.4g ms; decode(p) = %.4g p^2 + %.4g p + %.4g ms (speedup %g)",
        *model.prefill_coeffs,
        *model.decode_coeffs,
        model.speedup_ratio,
    )
    log.info(
        "fit error: prefill median %.1f%% max %.1f%%, decode median %.1f%% max %.1f%%",
        100 * err.prefill_median,
        100 * err.prefill_max,
        100 * err.decode_median,
        100 * err.decode_max,
    )
