"""Configuration of one benchmark run, validated at construction."""

from __future__ import annotations

from dataclasses import dataclass

from lightspeed.bench.workload import DEFAULT_MIN_TOKEN_ID, DEFAULT_VOCAB_SIZE

MODES = ("auto", "closed", "open")
TRACE_FORMATS = ("auto", "mooncake", "azure")


@dataclass(frozen=True, slots=True)
class BenchConfig:
    """Where to send load, what load, and where the report goes.

    Closed loop keeps `concurrency` requests in flight; open loop sends each request at its
    arrival offset / `speedup` (a trace, or Poisson arrivals at `request_rate`), with
    `concurrency` as an optional in-flight cap (0 = none). "auto" picks open loop when there
    is an arrival schedule. `num_requests` / `duration_s` bound the measured phase; `warmup`
    requests run first and are not counted.
    """

    url: str
    model: str | None = None  # None: the first model the server lists
    endpoint: str = "/v1/completions"
    mode: str = "auto"
    concurrency: int = 32
    num_requests: int | None = 1000
    duration_s: float | None = None
    warmup: int = 0
    isl: int = 64
    osl: int = 16
    shared_prefix_ratio: float = 0.0
    request_rate: float = 0.0
    trace: str | None = None
    trace_format: str = "auto"
    speedup: float = 1.0
    trace_start_s: float = 0.0
    trace_window_s: float | None = None
    max_output_tokens: int | None = None
    vocab_size: int = DEFAULT_VOCAB_SIZE
    min_token_id: int = DEFAULT_MIN_TOKEN_ID
    ignore_eos: bool = True
    seed: int = 0
    timeout_s: float = 600.0
    api_key: str | None = None
    keepalive: bool = True
    # Send a trace's session ids as `x-session-id` (our router keeps a session on one worker).
    # Off where routers must be compared without it, e.g. against one that ignores the header.
    session_ids: bool = True
    out_dir: str | None = None
    label: str = ""
    progress: bool = True
    save_requests: bool = False

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://; got {self.url!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        if self.trace_format not in TRACE_FORMATS:
            raise ValueError(f"trace_format must be one of {', '.join(TRACE_FORMATS)}")
        if self.concurrency < 0 or (self.concurrency == 0 and self.resolved_mode == "closed"):
            raise ValueError(f"concurrency must be >= 1 in closed loop; got {self.concurrency}")
        self._check_bounds()

    def _check_bounds(self) -> None:
        if self.num_requests is not None and self.num_requests < 1:
            raise ValueError(f"num_requests must be >= 1; got {self.num_requests}")
        if self.duration_s is not None and self.duration_s <= 0:
            raise ValueError(f"duration_s must be > 0; got {self.duration_s}")
        if self.num_requests is None and self.duration_s is None and self.trace is None:
            raise ValueError("a synthetic run needs num_requests or duration_s")
        for name in ("warmup", "isl", "osl", "seed"):
            if getattr(self, name) < (0 if name in ("warmup", "seed") else 1):
                raise ValueError(f"{name} out of range: {getattr(self, name)}")
        if not 0.0 <= self.shared_prefix_ratio <= 1.0:
            raise ValueError(f"shared_prefix_ratio must be in [0, 1]; got {self.shared_prefix_ratio}")
        if self.request_rate < 0 or self.speedup <= 0 or self.timeout_s <= 0:
            raise ValueError("request_rate must be >= 0, speedup and timeout_s > 0")
        if self.resolved_mode == "open" and self.trace is None and self.request_rate <= 0:
            raise ValueError("open loop without a trace needs request_rate > 0")

    @property
    def resolved_mode(self) -> str:
        if self.mode != "auto":
            return self.mode
        return "open" if self.trace is not None or self.request_rate > 0 else "closed"
