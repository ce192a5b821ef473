"""Component configuration: one frozen, validated dataclass per process kind.

The CLI binds flags to these (cli.py); every flag also reads `LIGHTSPEED_<FLAG>` from the
environment. Validation lives in `__post_init__` so a bad value fails at start with a clear
ValueError instead of deep inside a running server.
"""

from __future__ import annotations

from dataclasses import dataclass

ROUTER_MODES = ("round-robin", "random", "least-loaded", "power-of-two", "direct", "kv", "kv-latency")
KV_ROUTER_MODES = ("kv", "kv-latency")
QUEUE_POLICIES = ("fcfs", "wspt")
DISCOVERY_KINDS = ("mem", "file")
EVENT_PLANE_KINDS = ("zmq",)
ENGINE_KINDS = ("mocker", "native")
ROLES = ("agg", "prefill", "decode")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _check_positive(name: str, value: float) -> None:
    if value <= 0:
        raise ValueError(f"{name} must be > 0; got {value}")


def _check_port(port: int) -> None:
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be in 0..65535; got {port}")


@dataclass(frozen=True)
class PlaneConfig:
    """How a process finds its peers: discovery backend and event plane."""

    discovery: str = "file"
    discovery_path: str = ""  # folder for the file backend; "" = a per-user default
    discovery_ttl: float = 10.0
    event_plane: str = "zmq"
    namespace: str = "lightspeed"

    def __post_init__(self) -> None:
        _check_choice("discovery", self.discovery, DISCOVERY_KINDS)
        _check_choice("event_plane", self.event_plane, EVENT_PLANE_KINDS)
        _check_positive("discovery_ttl", self.discovery_ttl)
        if not self.namespace:
            raise ValueError("namespace must not be empty")


@dataclass(frozen=True)
class RouterConfig:
    """Knobs of the KV-aware modes (DESIGN §4) and of session affinity / replica sync."""

    overlap_score_weight: float = 1.0
    temperature: float = 0.0
    kv_events: bool = True  # False = approximate mode: no events, own decisions with a TTL
    approx_ttl: float = 120.0
    busy_decode_threshold: float = 0.0  # busy above this fraction of KV blocks active; 0 = off
    busy_prefill_frac: float = 0.0  # busy above this multiple of max_num_batched_tokens queued; 0 = off
    queue_policy: str = "fcfs"
    max_queue: int = 1024  # waiting requests past this get 503
    queue_timeout: float = 60.0
    session_ttl: float = 600.0
    replica_sync: bool = True  # share active load with other frontends over the event plane

    def __post_init__(self) -> None:
        _check_choice("queue_policy", self.queue_policy, QUEUE_POLICIES)
        for name in ("overlap_score_weight", "temperature", "busy_decode_threshold", "busy_prefill_frac", "max_queue"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)}")
        for name in ("approx_ttl", "queue_timeout", "session_ttl"):
            _check_positive(name, getattr(self, name))


@dataclass(frozen=True)
class FrontendConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    router_mode: str = "round-robin"
    planes: PlaneConfig = PlaneConfig()
    max_body_bytes: int = 8 * 1024 * 1024
    processes: int = 1  # frontend processes sharing the port (SO_REUSEPORT)
    migration_limit: int = 0  # re-sends of a request after its worker is lost
    served_model_name: str = ""  # "" = whatever workers register
    router: RouterConfig = RouterConfig()

    def __post_init__(self) -> None:
        _check_port(self.port)
        _check_choice("router_mode", self.router_mode, ROUTER_MODES)
        _check_positive("max_body_bytes", self.max_body_bytes)
        _check_positive("processes", self.processes)
        if self.migration_limit < 0:
            raise ValueError(f"migration_limit must be >= 0; got {self.migration_limit}")


@dataclass(frozen=True)
class WorkerConfig:
    engine: str = "mocker"
    model: str = ""  # "" = the packaged default model
    served_model_name: str = ""
    role: str = "agg"
    host: str = "127.0.0.1"
    port: int = 0  # request-plane port; 0 = ephemeral
    planes: PlaneConfig = PlaneConfig()
    block_size: int = 64
    num_gpu_blocks: int = 0  # 0 = the engine's default (mocker 16384; native sized by kv_cache_gb)
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 0  # 0 = the model's context length
    speedup_ratio: float = 1.0
    kv_cache_gb: float = 0.0  # native engine: size the cache in GB instead of blocks
    dtype: str = "auto"  # native engine: auto = float32 on CPU, bfloat16 on CUDA
    enable_prefix_caching: bool = True
    metrics_interval: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        _check_choice("engine", self.engine, ENGINE_KINDS)
        _check_choice("role", self.role, ROLES)
        _check_choice("dtype", self.dtype, DTYPES)
        _check_port(self.port)
        if self.num_gpu_blocks < 0:
            raise ValueError(f"num_gpu_blocks must be >= 0; got {self.num_gpu_blocks}")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            _check_positive(name, getattr(self, name))
        _check_positive("speedup_ratio", self.speedup_ratio)
        _check_positive("metrics_interval", self.metrics_interval)
        if self.max_model_len < 0 or self.kv_cache_gb < 0:
            raise ValueError("max_model_len and kv_cache_gb must be >= 0")


@dataclass(frozen=True)
class ServeConfig:
    """`lightspeed serve`: one frontend plus N local workers under a supervisor."""

    frontend: FrontendConfig
    worker: WorkerConfig
    workers: int = 1

    def __post_init__(self) -> None:
        _check_positive("workers", self.workers)
        if self.frontend.planes != self.worker.planes:
            raise ValueError("frontend and workers must share discovery and event-plane settings")
