import pytest

from lightspeed.bench.workload import RequestSpec, SyntheticWorkload, TokenSpace


def test_synthetic_shapes_prefix_and_determinism() -> None:
    w = SyntheticWorkload(isl=10, osl=4, count=3, shared_prefix_ratio=0.4, seed=7)
    specs = list(w)
    assert w.size == 3 and w.prefix_len == 4
    assert [s.prompt_len for s in specs] == [10, 10, 10]
    assert [s.max_tokens for s in specs] == [4, 4, 4]
    assert [s.arrival_s for s in specs] == [0.0, 0.0, 0.0]
    a, b, c = (s.prompt for s in specs)
    assert a[:4] == b[:4] == c[:4]
    assert a[4:] != b[4:]
    assert specs == list(w)  # re-iterable, same seed -> same prompts
    assert all(100 <= t < 49152 for s in specs for t in s.prompt)


def test_synthetic_poisson_arrivals_and_unbounded() -> None:
    w = SyntheticWorkload(isl=2, osl=1, count=50, request_rate=10.0, seed=1)
    arrivals = [s.arrival_s for s in w]
    assert arrivals[0] == 0.0
    assert arrivals == sorted(arrivals)
    assert 2.0 < arrivals[-1] < 10.0  # ~49 gaps of mean 0.1 s
    endless = iter(SyntheticWorkload(isl=2, osl=1, count=None))
    assert len([next(endless) for _ in range(100)]) == 100


def test_validation() -> None:
    with pytest.raises(ValueError):
        SyntheticWorkload(isl=0, osl=1, count=1)
    with pytest.raises(ValueError):
        SyntheticWorkload(isl=1, osl=1, count=1, shared_prefix_ratio=1.5)
    with pytest.raises(ValueError):
        RequestSpec((1, 2), max_tokens=0)
    with pytest.raises(ValueError):
        TokenSpace(vocab_size=100, min_token_id=100)
    assert RequestSpec("hello", 3).prompt_len is None
