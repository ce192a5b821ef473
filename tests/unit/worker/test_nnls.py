from __future__ import annotations

import itertools

import numpy as np
import pytest

from lightspeed.worker.nnls import nnls


def brute_force(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The best non-negative least-squares solution over every choice of free columns."""
    n = a.shape[1]
    best, best_cost = np.zeros(n), float(b @ b)
    for k in range(1, n + 1):
        for cols in itertools.combinations(range(n), k):
            z = np.zeros(n)
            z[list(cols)] = np.linalg.lstsq(a[:, list(cols)], b, rcond=None)[0]
            cost = float(np.sum((a @ z - b) ** 2))
            if (z >= 0).all() and cost < best_cost - 1e-12:
                best, best_cost = z, cost
    return best


def test_unconstrained_solution_is_kept_when_already_non_negative() -> None:
    a = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    x_true = np.array([2.0, 3.0])
    assert nnls(a, a @ x_true) == pytest.approx(x_true, abs=1e-12)


def test_binding_constraint_zeroes_the_coefficient() -> None:
    # Least squares wants x = (1, -1); with x >= 0 the best is x2 = 0 and x1 = mean fit.
    a = np.array([[1.0, 0.0], [1.0, 1.0]])
    b = np.array([1.0, 0.0])
    assert nnls(a, b) == pytest.approx([0.5, 0.0], abs=1e-12)


@pytest.mark.parametrize("seed", range(20))
def test_matches_brute_force_on_random_problems(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(12, 5))
    b = rng.normal(size=12)
    x = nnls(a, b)
    assert (x >= 0).all()
    assert x == pytest.approx(brute_force(a, b), abs=1e-9)


def test_all_negative_target_gives_zero() -> None:
    a = np.eye(3)
    assert nnls(a, np.array([-1.0, -2.0, -3.0])).tolist() == [0.0, 0.0, 0.0]


def test_shape_mismatch_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        nnls(np.eye(3), np.ones(2))
