"""Fit the step-time model from a profiling sweep, and the profile file the planner loads.

The fit is the worker's own (worker/perf_fit.py: shape-constrained median regression by NNLS),
so a profiled model and one a worker fits online from live steps are the same estimator on
different data. It runs over the sweep's cells: each cell (one prefill size, or one decode batch
x context) enters as one step whose time sums up the cell's measured steps, by the statistic that
suits the engine's noise (`statistic_for`):
  * mocker: the mean. Event-loop timers tick in whole milliseconds, so its steps come out a
    millisecond long or short by turns, and a step that ran late is paid back by shorter ones
    after it (it carries each timer error into its next sleep): only the mean is its model, and
    a median or a trimmed mean is biased.
  * a real engine: the median. Its steps are independent, and noise on a shared machine only
    adds time (a neighbour on the cores stretched single prefill steps 2-6x in the committed
    profiles), so one stall moves a mean by tens of percent and a median not at all.
A cell spoilt all through still cannot pull the fit far: across cells the fit is a median
regression. Prefill cells enter as prefill-only steps and decode cells as decode-only steps, as
the engine reports them (profile_sweep.py). Times are fitted in the model's reference
milliseconds, wall ms times the engine's speedup ratio, with that ratio set on the model, so a
profiled mocker reproduces the `PerfModel` its worker card publishes. Every measured step is kept
in the file, so the fit can be redone or checked.

The file (`--out`, JSON) holds the model, every measured point, the fit's error, the engine and
its limits, the host CPU and the command that made it. `load_perf_model` is what a planner (or a
worker taking `--perf-model`) reads; a file that is not a profile, or holds no trusted fit, is a
ValueError that names the file and the problem.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import msgspec

from lightspeed.planner.profile_sweep import Phase, ProfilePoint
from lightspeed.protocol import PerfModel
from lightspeed.worker.perf_fit import FitLimits, PerfFitter, StepSample

PROFILE_FORMAT = 1


class EngineInfo(msgspec.Struct, frozen=True):
    """The engine that was measured; the planner sizes decode batches from its KV capacity."""

    engine: str
    model: str
    dtype: str
    block_size: int
    num_blocks: int
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    speedup_ratio: float = 1.0

    @property
    def kv_capacity_tokens(self) -> int:
        return self.block_size * self.num_blocks


class HostInfo(msgspec.Struct, frozen=True):
    cpu_model: str
    cpu_flags: str
    cpus: int
    # Other processes on a shared machine slow every step down: how busy it was (1, 5, 15 min).
    loadavg_at_end: tuple[float, float, float] = (0.0, 0.0, 0.0)


class SweepInfo(msgspec.Struct, frozen=True):
    prefill_sizes: list[int]
    batch_sizes: list[int]
    context_lens: list[int]
    repeats: int
    warmup: int
    skipped_cells: list[tuple[int, int]] = []  # (batch, context) over the KV cache, not measured


class FitError(msgspec.Struct, frozen=True):
    """|fit - measured| / measured over each phase's cells: median and largest."""

    prefill_median: float
    prefill_max: float
    decode_median: float
    decode_max: float


class Profile(msgspec.Struct, frozen=True):
    """A `lightspeed profile` result. `perf` is None when the fit was rejected (`fit_rejected`
    says why); the points are kept either way."""

    engine: EngineInfo
    host: HostInfo
    sweep: SweepInfo
    points: list[ProfilePoint]
    command: str
    created: str  # ISO 8601, UTC
    perf: PerfModel | None = None
    fit_error: FitError | None = None
    fit_rejected: str | None = None
    seconds: float = 0.0  # the sweep's wall time
    cell_statistic: CellStatistic = "mean"  # how each cell's steps were summed up for the fit
    format: int = PROFILE_FORMAT


# A profile cell averages many steps: a handful of cells pins the model down, where the worker's
# defaults ask for more single steps (the fitter's other limits, sizes and spans, still apply).
CELL_LIMITS = FitLimits(min_prefill_steps=3, min_decode_steps=3)


CellStatistic = Literal["mean", "median"]
_STATISTICS: dict[str, Callable[[list[float]], float]] = {"mean": statistics.fmean, "median": statistics.median}


def statistic_for(engine: str) -> CellStatistic:
    """The mocker's steps repay each other's timer error (the mean is exact); a real engine's
    are independent with additive noise (the median ignores stalls). See the module doc."""
    return "mean" if engine == "mocker" else "median"


def cell_means(points: Sequence[ProfilePoint], statistic: CellStatistic = "mean") -> list[ProfilePoint]:
    """One point per sweep cell (phase, prefill size, batch, context): the mean usage and the
    cell's time by `statistic` over its steps."""
    cells: dict[tuple[Phase, int, int, int], list[ProfilePoint]] = {}
    for p in points:
        cells.setdefault((p.phase, p.prefill_tokens, p.batch_size, p.context_len), []).append(p)
    summary = _STATISTICS[statistic]
    return [
        ProfilePoint(phase, t, b, ctx, statistics.fmean(p.kv_usage for p in group), summary([p.ms for p in group]))
        for (phase, t, b, ctx), group in cells.items()
    ]


def fit_points(
    points: Sequence[ProfilePoint], speedup_ratio: float = 1.0, statistic: CellStatistic = "mean"
) -> tuple[PerfModel | None, str | None]:
    """The `PerfModel` of the sweep's cells, or (None, why the worker's fitter rejects them)."""
    fitter = PerfFitter(window=max(1, len(points)), limits=CELL_LIMITS)
    model = fitter.fit([_sample(p, speedup_ratio) for p in cell_means(points, statistic)])
    if model is None:
        return None, f"{fitter.rejected} (one step per sweep cell)"
    return msgspec.structs.replace(model, speedup_ratio=speedup_ratio), None


def _sample(point: ProfilePoint, speedup_ratio: float) -> StepSample:
    """A point as the worker's fitter takes a step, in reference seconds (wall x speedup)."""
    seconds = point.ms * speedup_ratio / 1000.0
    if point.phase == "prefill":
        return StepSample(point.prefill_tokens, 0, point.kv_usage, seconds)
    return StepSample(0, point.batch_size, point.kv_usage, seconds)


def predicted_ms(model: PerfModel, point: ProfilePoint) -> float:
    """The model's wall milliseconds for the step a point measured."""
    ms = model.prefill_ms(point.prefill_tokens) if point.phase == "prefill" else model.decode_ms(point.kv_usage)
    return ms / model.speedup_ratio


def fit_error(model: PerfModel, points: Sequence[ProfilePoint], statistic: CellStatistic = "mean") -> FitError:
    """Relative misses of the model on each phase's cells (0 for a phase with none)."""
    stats: list[float] = []
    cells = cell_means(points, statistic)
    for phase in ("prefill", "decode"):
        misses = [abs(predicted_ms(model, p) - p.ms) / p.ms for p in cells if p.phase == phase and p.ms > 0]
        stats += [statistics.median(misses), max(misses)] if misses else [0.0, 0.0]
    return FitError(*stats)


def save_profile(profile: Profile, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(msgspec.json.format(msgspec.json.encode(profile), indent=1) + b"\n")


def load_profile(path: str | Path) -> Profile:
    """Read a profile file; ValueError naming the file when it is missing or malformed."""
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise ValueError(f"cannot read profile {path}: {err.strerror or err}") from None
    try:
        profile = msgspec.json.decode(raw, type=Profile)
    except msgspec.DecodeError as err:  # ValidationError included: names the bad field
        raise ValueError(f"{path} is not a lightspeed profile: {err}") from None
    if profile.format != PROFILE_FORMAT:
        raise ValueError(f"{path}: profile format {profile.format} is not supported (expected {PROFILE_FORMAT})")
    return profile


def load_perf_model(path: str | Path) -> PerfModel:
    """The fitted step-time model of a profile file (what the planner sizes pools with)."""
    profile = load_profile(path)
    if profile.perf is None:
        raise ValueError(f"{path} holds no fitted model (fit rejected: {profile.fit_rejected or 'unknown reason'})")
    _check_model(profile.perf, path)
    return profile.perf


def _check_model(model: PerfModel, path: str | Path) -> None:
    """A hand-edited file must not hand the planner a model it cannot divide by (JSON itself
    holds no NaN or infinity: the decoder refuses them)."""
    if not model.speedup_ratio > 0:
        raise ValueError(f"{path}: perf.speedup_ratio must be > 0, got {model.speedup_ratio}")
