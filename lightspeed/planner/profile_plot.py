"""The profile's picture: measured step times against the fitted model, prefill and decode panels.
Every measured step is a small dot; each cell's mean or median (what the fit takes) a diamond.

Plots need matplotlib (a test extra); without it the JSON is still written and the plot is
skipped with a log line.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lightspeed.planner.profiler import Profile, cell_means

log = logging.getLogger(__name__)

_CURVE_POINTS = 200


def _pyplot() -> Any:  # matplotlib ships no stubs
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; never try to open a display
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib not installed: skipping the profile plot")
        return None
    return plt


def write_plot(profile: Profile, path: Path) -> bool:
    """Write the two-panel PNG; False when matplotlib is missing."""
    plt = _pyplot()
    if plt is None:
        return False
    fig, (pre, dec) = plt.subplots(1, 2, figsize=(12, 4.5))
    _prefill_panel(pre, profile)
    _decode_panel(dec, profile)
    eng = profile.engine
    fig.suptitle(
        f"lightspeed profile: {eng.engine} {eng.model} {eng.dtype} (speedup {eng.speedup_ratio:g})\n"
        f"{profile.host.cpu_model}, {profile.host.cpus} CPUs",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _prefill_panel(ax: Any, profile: Profile) -> None:
    pts = [p for p in profile.points if p.phase == "prefill"]
    means = cell_means(pts, profile.cell_statistic)
    ax.scatter([p.prefill_tokens for p in pts], [p.ms for p in pts], s=10, alpha=0.35, label="measured steps")
    ax.scatter(
        [p.prefill_tokens for p in means],
        [p.ms for p in means],
        s=40,
        marker="D",
        label=f"cell {profile.cell_statistic}s (fitted)",
    )
    model = profile.perf
    if model is not None and pts:
        top = max(p.prefill_tokens for p in pts)
        xs = [max(1, round(top * i / _CURVE_POINTS)) for i in range(_CURVE_POINTS + 1)]
        ys = [model.prefill_ms(x) / model.speedup_ratio for x in xs]
        a, b, c = model.prefill_coeffs
        ax.plot(xs, ys, color="C3", label=f"fit: {a:.3g}·t² + {b:.3g}·t + {c:.3g} (ref ms)")
        _error_note(ax, profile, "prefill")
    ax.set_xlabel("uncached prompt tokens in the step (t)")
    ax.set_ylabel("step wall time (ms)")
    ax.set_title("prefill")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")


def _decode_panel(ax: Any, profile: Profile) -> None:
    pts = [p for p in profile.points if p.phase == "decode"]
    means = cell_means(pts, profile.cell_statistic)
    for i, batch in enumerate(sorted({p.batch_size for p in pts})):
        sub = [p for p in pts if p.batch_size == batch]
        ax.scatter([p.kv_usage for p in sub], [p.ms for p in sub], s=10, alpha=0.35, color=f"C{i}")
        cells = [p for p in means if p.batch_size == batch]
        ax.scatter(
            [p.kv_usage for p in cells], [p.ms for p in cells], s=40, marker="D", color=f"C{i}", label=f"B={batch}"
        )
    model = profile.perf
    if model is not None and pts:
        top = max(p.kv_usage for p in pts)
        xs = [top * i / _CURVE_POINTS for i in range(_CURVE_POINTS + 1)]
        ys = [model.decode_ms(x) / model.speedup_ratio for x in xs]
        d, e, f = model.decode_coeffs
        ax.plot(xs, ys, color="black", label=f"fit: {d:.3g}·p² + {e:.3g}·p + {f:.3g} (ref ms)")
        _error_note(ax, profile, "decode")
    ax.set_xlabel("KV usage p (active blocks / total)")
    ax.set_ylabel("step wall time (ms)")
    ax.set_title("decode (batch x context)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")


def _error_note(ax: Any, profile: Profile, phase: str) -> None:
    err = profile.fit_error
    if err is None:
        return
    median, worst = (err.prefill_median, err.prefill_max) if phase == "prefill" else (err.decode_median, err.decode_max)
    text = f"|fit - measured| / measured: median {median:.1%}, max {worst:.1%}"
    ax.text(0.98, 0.02, text, transform=ax.transAxes, ha="right", va="bottom", fontsize=8)
