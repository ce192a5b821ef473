"""Modelled vs wall-clock step time of one engine, and the lag between them.

A mocker worker promises to take exactly its timing model's time per step; a fleet of them on a
busy machine can fall behind that promise (Python bookkeeping, the frontend and other workers on
the same cores, timer oversleep), and then every fleet-level result it produces is silently
slower than the model says. The clock makes that visible: over each *busy period* (steps run
back to back since the engine last went idle) it compares the wall time elapsed since the period
began with the modelled time of the steps run in it. The difference is the lag; a fleet that
keeps up holds it near zero (within a timer tick), one that is CPU-bound sees it grow.

Steps are measured emission to emission: the executor reports the modelled time between the
previous step's outputs and this step's (for the mocker: the previous step's decode phase, which
runs after its tokens leave, plus this step's prefill phase). Engines without a timing model
(the native runner) report no modelled time; their wall time is still counted.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ClockReading:
    """Totals since the engine started, and the current busy period's lag."""

    wall_seconds: float  # busy wall time, summed over steps
    modelled_seconds: float  # modelled time of the steps that have a model
    lag_seconds: float  # wall - modelled over the current busy period (0 when idle)


class StepClock:
    """Fed by the engine core: `begin` at each step start, `end` when its outputs are out,
    `idle` when the engine waits for work. Times are `time.perf_counter()` seconds."""

    __slots__ = ("_anchor", "_last_end", "_max_lag", "_modelled", "_period_modelled", "_wall", "lag")

    def __init__(self) -> None:
        self._anchor: float | None = None  # when the current busy period began
        self._last_end: float | None = None  # the previous step's emission, within the period
        self._period_modelled = 0.0
        self._wall = 0.0
        self._modelled = 0.0
        self._max_lag = 0.0
        self.lag = 0.0

    def begin(self, now: float) -> None:
        if self._anchor is None:
            self._anchor = self._last_end = now
            self._period_modelled = 0.0

    def end(self, now: float, modelled_seconds: float | None) -> None:
        if self._anchor is None or self._last_end is None:
            raise RuntimeError("StepClock.end without begin")
        self._wall += now - self._last_end
        self._last_end = now
        if modelled_seconds is None:
            return
        self._modelled += modelled_seconds
        self._period_modelled += modelled_seconds
        self.lag = (now - self._anchor) - self._period_modelled
        self._max_lag = max(self._max_lag, self.lag)

    def idle(self) -> None:
        """The engine ran out of work: the next step starts a new busy period."""
        self._anchor = self._last_end = None
        self.lag = 0.0

    def reading(self) -> ClockReading:
        return ClockReading(self._wall, self._modelled, self.lag)

    def take_max_lag(self) -> float:
        """The largest lag since the previous call (what a periodic publisher reports)."""
        worst, self._max_lag = self._max_lag, self.lag
        return worst
