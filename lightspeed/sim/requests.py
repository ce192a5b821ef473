"""Per-request bookkeeping of a replay: what the bench client would have measured."""

from __future__ import annotations

from dataclasses import dataclass, field

from lightspeed.bench.client import RequestResult


@dataclass(slots=True)
class SimRequest:
    """One request's life in virtual seconds since the replay started."""

    request_id: str
    arrival_s: float
    prompt_tokens: int
    max_tokens: int
    worker_id: str = ""
    first_s: float | None = None
    last_s: float = 0.0
    itls: list[float] = field(default_factory=list)
    output_tokens: int = 0
    cached_tokens: int | None = None
    end_s: float | None = None
    error: str | None = None
    error_detail: str | None = None

    def on_tokens(self, now: float, count: int, cached: int | None) -> float | None:
        """Tokens arrived at `now`; returns the inter-token gap (None for the first token)."""
        gap: float | None = None
        if self.first_s is None:
            self.first_s = now
            self.cached_tokens = cached
        else:
            gap = now - self.last_s
            self.itls.append(gap)
        self.last_s = now
        self.output_tokens += count
        return gap

    def fail(self, now: float, error: str, detail: str) -> None:
        self.end_s = now
        self.error = error
        self.error_detail = detail

    def result(self) -> RequestResult:
        """As `lightspeed bench` records it (HTTP 200 streams, or the status a failure gets)."""
        end = self.end_s if self.end_s is not None else self.last_s
        if self.error is not None:
            status = int(self.error.removeprefix("http_")) if self.error.startswith("http_") else 0
            return RequestResult(
                start_s=self.arrival_s,
                e2e_s=end - self.arrival_s,
                prompt_tokens=self.prompt_tokens,
                status=status,
                error=self.error,
                error_detail=self.error_detail,
            )
        return RequestResult(
            start_s=self.arrival_s,
            e2e_s=end - self.arrival_s,
            ttft_s=None if self.first_s is None else self.first_s - self.arrival_s,
            itls_s=self.itls,
            output_tokens=self.output_tokens,
            prompt_tokens=self.prompt_tokens,
            cached_tokens=self.cached_tokens,
            status=200,
        )
