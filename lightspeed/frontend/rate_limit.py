"""Per-API-key request-rate and token-rate limits (token buckets), answered with 429 + Retry-After.

Each key has two buckets refilled continuously at `limit / 60` per second, holding at most one
minute's worth (so a key may burst up to its per-minute limit, then settles at the rate):

* requests: one unit taken at admission; an empty bucket refuses the request.
* tokens: a request's real size (prompt + completion tokens) is only known when it ends, so the
  bucket is charged afterwards and may go negative ("debt"); a key in debt is refused until the
  refill brings it back above zero. Nothing is guessed up front, and a key cannot exceed its
  token rate by more than the one request in flight when the bucket ran out.

The limiter keeps one entry per configured key (a bounded set: keys come from configuration,
never from clients), so no client can grow it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from lightspeed.errors import RateLimited

Now = Callable[[], float]


class Bucket:
    """A token bucket in continuous time; `level` may go below zero when charged after the fact."""

    def __init__(self, per_minute: float, now: float) -> None:
        if not per_minute > 0:
            raise ValueError(f"a rate limit must be > 0 per minute; got {per_minute}")
        self.capacity = per_minute
        self.rate = per_minute / 60.0  # units per second
        self.level = per_minute  # a key starts with a full minute's allowance
        self._last = now

    def refill(self, now: float) -> None:
        if now > self._last:
            self.level = min(self.capacity, self.level + (now - self._last) * self.rate)
        self._last = max(self._last, now)

    def wait_for(self, amount: float) -> float:
        """Seconds until `amount` units are in the bucket (0 when they are now)."""
        missing = amount - self.level
        return 0.0 if missing <= 0 else missing / self.rate

    def charge(self, amount: float) -> None:
        self.level -= amount


@dataclass(frozen=True)
class Limits:
    """A key's limits per minute; 0 = unlimited."""

    rpm: float = 0.0
    tpm: float = 0.0

    def __post_init__(self) -> None:
        for name in ("rpm", "tpm"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0; got {value}")


class _KeyState:
    def __init__(self, limits: Limits, now: float) -> None:
        self.requests = Bucket(limits.rpm, now) if limits.rpm > 0 else None
        self.tokens = Bucket(limits.tpm, now) if limits.tpm > 0 else None


class RateLimiter:
    """Admission and post-hoc charging for a fixed set of keys (by name)."""

    def __init__(self, limits: dict[str, Limits], now: Now = time.monotonic) -> None:
        self._now = now
        start = now()
        self._keys = {name: _KeyState(lim, start) for name, lim in limits.items() if lim.rpm > 0 or lim.tpm > 0}

    def admit(self, key: str) -> None:
        """Take one request for `key`, or raise RateLimited with the seconds to wait."""
        state = self._keys.get(key)
        if state is None:
            return
        now = self._now()
        waits: list[tuple[float, str]] = []
        if state.requests is not None:
            state.requests.refill(now)
            waits.append((state.requests.wait_for(1.0), "requests"))
        if state.tokens is not None:
            state.tokens.refill(now)
            # In debt (<= 0): wait until the level is back above zero (a sliver above, so the
            # Retry-After a client honours actually lets it in).
            waits.append((state.tokens.wait_for(1e-9), "tokens"))
        wait, what = max(waits, default=(0.0, ""))
        if wait > 0:
            raise RateLimited(
                f"rate limit reached for {what} on API key '{key}'; retry after {math.ceil(wait)} s",
                retry_after=wait,
                code=f"rate_limit_{what}",
            )
        if state.requests is not None:
            state.requests.charge(1.0)

    def charge_tokens(self, key: str, tokens: int) -> None:
        """Charge what a finished (or cut) request used against `key`'s token rate."""
        state = self._keys.get(key)
        if state is None or state.tokens is None or tokens <= 0:
            return
        state.tokens.refill(self._now())
        state.tokens.charge(float(tokens))

    def remaining(self, key: str) -> tuple[float | None, float | None]:
        """(requests, tokens) left now, None where unlimited: for x-ratelimit-* headers."""
        state = self._keys.get(key)
        if state is None:
            return None, None
        now = self._now()
        out: list[float | None] = []
        for bucket in (state.requests, state.tokens):
            if bucket is None:
                out.append(None)
            else:
                bucket.refill(now)
                out.append(max(0.0, bucket.level))
        return out[0], out[1]
