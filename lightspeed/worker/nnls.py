"""Non-negative least squares, min ||A x - b|| subject to x >= 0, in numpy alone.

Lawson and Hanson's active-set method ("Solving Least Squares Problems", 1974, ch. 23), the
algorithm behind scipy.optimize.nnls; the step-time fit needs it for a handful of columns and
scipy is not a dependency. Exact for such small problems: it ends on the KKT point (every free
coefficient solves the unconstrained problem on the free set, every bound one has a gradient
pointing into the constraint), in at most a few passes per column.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

Vector = NDArray[np.float64]
Matrix = NDArray[np.float64]


def nnls(a: Matrix, b: Vector, max_iter: int | None = None) -> Vector:
    """The x >= 0 minimising ||a @ x - b||. Columns should be of comparable scale."""
    m, n = a.shape
    if b.shape != (m,):
        raise ValueError(f"b must have shape ({m},), got {b.shape}")
    tol = 10.0 * np.finfo(np.float64).eps * float(np.abs(a).sum(axis=0).max(initial=0.0)) * max(m, n)
    x = np.zeros(n)
    free = np.zeros(n, dtype=bool)
    for _ in range(max_iter if max_iter is not None else 3 * n):
        grad = a.T @ (b - a @ x)  # minus the gradient of the half squared residual
        grad[free] = -np.inf
        j = int(np.argmax(grad))
        if free.all() or grad[j] <= tol:
            break
        free[j] = True
        x = _solve_free(a, b, x, free, tol)
    return x


def _solve_free(a: Matrix, b: Vector, x: Vector, free: NDArray[np.bool_], tol: float) -> Vector:
    """Move from `x` toward the unconstrained solution on the free set, freezing (at zero) each
    coefficient that would turn negative, until that solution is feasible. Updates `free`."""
    while True:
        z = np.zeros_like(x)
        z[free] = np.linalg.lstsq(a[:, free], b, rcond=None)[0]
        blocked = free & (z <= tol)
        if not blocked.any():
            return z
        # The longest step from x toward z that keeps every free coefficient >= 0 (a zero
        # coefficient that would go negative allows no step at all).
        gap = x[blocked] - z[blocked]
        alpha = float(np.min(np.divide(x[blocked], gap, out=np.zeros_like(gap), where=gap > 0)))
        x = x + alpha * (z - x)
        free &= x > tol
        x[~free] = 0.0
