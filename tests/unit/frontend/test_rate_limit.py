"""Token buckets per API key: exact admission, refill and debt arithmetic on a fake clock."""

from __future__ import annotations

import pytest

from lightspeed.errors import RateLimited
from lightspeed.frontend.rate_limit import Bucket, Limits, RateLimiter


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_bucket_refills_at_limit_per_minute_and_caps_at_one_minute() -> None:
    b = Bucket(60.0, now=0.0)
    b.charge(60.0)
    assert b.level == 0.0
    b.refill(0.5)
    assert b.level == pytest.approx(0.5)
    assert b.wait_for(1.0) == pytest.approx(0.5)
    b.refill(1000.0)
    assert b.level == 60.0


def test_bucket_refuses_nonpositive_limits() -> None:
    with pytest.raises(ValueError, match="> 0 per minute"):
        Bucket(0.0, now=0.0)


def test_limits_validate() -> None:
    with pytest.raises(ValueError, match="rpm"):
        Limits(rpm=-1.0)
    with pytest.raises(ValueError, match="tpm"):
        Limits(tpm=float("nan"))


def test_request_rate_admits_a_minute_of_burst_then_refuses_with_retry_after() -> None:
    clock = FakeClock()
    limiter = RateLimiter({"a": Limits(rpm=3)}, now=clock)
    for _ in range(3):
        limiter.admit("a")
    with pytest.raises(RateLimited) as err:
        limiter.admit("a")
    assert err.value.retry_after == pytest.approx(20.0)  # 3 per minute: one every 20 s
    assert err.value.code == "rate_limit_requests"
    assert err.value.status == 429
    clock.t += 20.0
    limiter.admit("a")  # exactly one came back
    with pytest.raises(RateLimited):
        limiter.admit("a")


def test_refused_request_takes_nothing() -> None:
    clock = FakeClock()
    limiter = RateLimiter({"a": Limits(rpm=1)}, now=clock)
    limiter.admit("a")
    for _ in range(5):
        with pytest.raises(RateLimited):
            limiter.admit("a")
    clock.t += 60.0
    limiter.admit("a")


def test_token_rate_is_charged_after_the_fact_and_debt_blocks_until_repaid() -> None:
    clock = FakeClock()
    limiter = RateLimiter({"a": Limits(tpm=600)}, now=clock)  # 10 tokens / s
    limiter.admit("a")
    limiter.charge_tokens("a", 700)  # 100 tokens of debt
    with pytest.raises(RateLimited) as err:
        limiter.admit("a")
    assert err.value.retry_after == pytest.approx(10.0)
    assert err.value.code == "rate_limit_tokens"
    clock.t += 10.0
    with pytest.raises(RateLimited):  # back to exactly 0: still not above
        limiter.admit("a")
    clock.t += 0.1
    limiter.admit("a")
    assert limiter.remaining("a") == (None, pytest.approx(1.0))


def test_keys_are_independent_and_unlimited_keys_always_pass() -> None:
    clock = FakeClock()
    limiter = RateLimiter({"a": Limits(rpm=1), "b": Limits(rpm=2), "free": Limits()}, now=clock)
    limiter.admit("a")
    limiter.admit("b")
    limiter.admit("b")
    with pytest.raises(RateLimited):
        limiter.admit("a")
    with pytest.raises(RateLimited):
        limiter.admit("b")
    for _ in range(100):
        limiter.admit("free")
        limiter.charge_tokens("free", 10**6)
    assert limiter.remaining("free") == (None, None)
    assert limiter.remaining("a") == (0.0, None)


def test_the_wait_reported_is_the_longer_of_both_limits() -> None:
    clock = FakeClock()
    limiter = RateLimiter({"a": Limits(rpm=60, tpm=60)}, now=clock)
    limiter.admit("a")
    limiter.charge_tokens("a", 90)  # 30 tokens of debt at 1 / s: 30 s; requests: none needed
    with pytest.raises(RateLimited) as err:
        limiter.admit("a")
    assert err.value.retry_after == pytest.approx(30.0)
