"""Component configuration: one frozen, validated dataclass per process kind.

Each option is declared once, as a field made by `opt()`: its type, default and help text. The
CLI (options.py, cli.py) generates its flags from these fields: the flag is `--<field-name>`
unless `opt(flag=...)` names another, a `Literal` type gives the choices, and every flag reads
`LIGHTSPEED_<FLAG>` from the environment. Adding an option is adding one field here.

Validation lives in `__post_init__` so a bad value fails at start with a clear ValueError instead
of deep inside a running server; `check_choices` validates every `Literal` field from its type.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import msgspec

from lightspeed.runtime.cluster_auth import check_secret

_T = TypeVar("_T")

# Exit status of a process whose configuration is invalid (a bad value, an unknown model):
# restarting it cannot help, so the supervisor does not.
CONFIG_ERROR_EXIT = 2


class ConfigError(ValueError):
    """A process cannot start with the configuration it was given (a bad value, an unknown
    model, a cache too small for the context). It exits with CONFIG_ERROR_EXIT, which the
    supervisor does not restart. A ValueError raised while serving is a bug, not this: it
    exits 1 and is restarted like any other crash."""


# `serve` hands each child its config as JSON (encode_config) in this environment variable.
CHILD_CONFIG_ENV = "LIGHTSPEED_CHILD_CONFIG"

RouterMode = Literal["round-robin", "random", "least-loaded", "power-of-two", "direct", "kv", "kv-latency"]
QueuePolicy = Literal["fcfs", "wspt"]
DiscoveryKind = Literal["mem", "file", "etcd"]
EventPlaneKind = Literal["zmq", "nats"]
EngineKind = Literal["mocker", "native"]
Role = Literal["agg", "prefill", "decode"]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]

ROUTER_MODES: tuple[str, ...] = get_args(RouterMode)
KV_ROUTER_MODES = ("kv", "kv-latency")
QUEUE_POLICIES: tuple[str, ...] = get_args(QueuePolicy)


def opt(default: _T, help: str, *, flag: str | None = None) -> _T:
    """One configuration option: a dataclass field whose metadata the CLI turns into a flag."""
    return field(default=default, metadata={"help": help, "flag": flag})


_HINTS: dict[type, dict[str, Any]] = {}


def type_hints(cls: type) -> dict[str, Any]:
    """The resolved field types of a config class (annotations are strings in this module)."""
    if cls not in _HINTS:
        _HINTS[cls] = get_type_hints(cls)
    return _HINTS[cls]


def choices_of(hint: Any) -> tuple[str, ...] | None:
    """The allowed values of a `Literal[...]` type, else None."""
    return get_args(hint) if get_origin(hint) is Literal else None


def check_choices(obj: Any) -> None:
    """Raise ValueError for a `Literal` field holding a value outside its choices."""
    hints = type_hints(type(obj))
    for f in fields(obj):
        allowed = choices_of(hints[f.name])
        value = getattr(obj, f.name)
        if allowed is not None and value not in allowed:
            raise ValueError(f"{f.name} must be one of {', '.join(allowed)}; got {value!r}")


def _check_positive(name: str, value: float) -> None:
    if value <= 0:
        raise ValueError(f"{name} must be > 0; got {value}")


# On SIGTERM a worker lets in-flight streams finish for up to this long, then cuts them; the
# frontend waits a little longer, so it reports a cut stream to its client before ending itself.
DRAIN_TIMEOUT_S = 10.0
DRAIN_HELP = "seconds in-flight streams may run on after SIGTERM; the rest end with an in-band error"


# Peers on other hosts dial what a process advertises, not what it binds (0.0.0.0 is no address).
ADVERTISE_HELP = (
    "address peers on other hosts dial to reach this process's request/event planes ('' = the listen "
    "address; with a wildcard listen address, this host's name resolved)"
)


def _check_drain(value: float) -> None:
    if value < 0:
        raise ValueError(f"drain_timeout must be >= 0; got {value}")


def _check_port(name: str, port: int) -> None:
    if not 0 <= port <= 65535:
        raise ValueError(f"{name} must be in 0..65535; got {port}")


@dataclass(frozen=True)
class PlaneConfig:
    """How a process finds its peers: discovery backend and event plane."""

    discovery: DiscoveryKind = opt("file", "service discovery backend")
    discovery_path: str = opt("", "folder of the file discovery backend ('' = a per-user default)")
    discovery_ttl: float = opt(10.0, "seconds before a silent worker's entry expires")
    event_plane: EventPlaneKind = opt("zmq", "event plane transport")
    namespace: str = opt("lightspeed", "namespace shared by frontends and workers")
    etcd_endpoints: str = opt("", "etcd client URLs, comma-separated (--discovery etcd), e.g. http://10.0.0.1:2379")
    etcd_user: str = opt("", "etcd user (with --etcd-password)")
    etcd_password: str = opt("", "etcd password (prefer the env var LIGHTSPEED_ETCD_PASSWORD)")
    etcd_ca: str = opt("", "etcd: CA certificate file (TLS; https:// endpoints)")
    etcd_cert: str = opt("", "etcd: client certificate file (mutual TLS; needs --etcd-key)")
    etcd_key: str = opt("", "etcd: client private key file (mutual TLS)")
    nats_url: str = opt("", "NATS server URLs, comma-separated (--event-plane nats), e.g. nats://10.0.0.1:4222")
    nats_user: str = opt("", "NATS user (with --nats-password)")
    nats_password: str = opt("", "NATS password (prefer the env var LIGHTSPEED_NATS_PASSWORD)")
    nats_creds: str = opt("", "NATS credentials file (JWT + nkey seed)")
    nats_ca: str = opt("", "NATS: CA certificate file (TLS; tls:// URLs)")
    nats_cert: str = opt("", "NATS: client certificate file (mutual TLS; needs --nats-key)")
    nats_key: str = opt("", "NATS: client private key file (mutual TLS)")
    nats_kv_max_msgs: int = opt(
        100_000, "KV events kept per worker on the JetStream stream; a router that missed trimmed ones asks for a dump"
    )
    nats_kv_max_age: float = opt(
        86400.0,
        "seconds KV events stay on the JetStream stream (0 = forever): bounds what SIGKILLed workers leave; "
        "a router that finds an idle worker's history aged out asks it for a dump",
    )
    cluster_secret: str = opt(
        "",
        "shared secret of the fleet: request-plane peers must prove it, discovery cards are signed with it "
        "('' = planes open; `serve` makes one per run; prefer the env var LIGHTSPEED_CLUSTER_SECRET)",
    )

    def __post_init__(self) -> None:
        check_choices(self)
        check_secret(self.cluster_secret)
        _check_positive("discovery_ttl", self.discovery_ttl)
        if not self.namespace:
            raise ValueError("namespace must not be empty")
        if self.discovery == "etcd" and not self.etcd_endpoints.strip(","):
            raise ValueError("etcd_endpoints is required with --discovery etcd")
        if self.event_plane == "nats" and not self.nats_url.strip(","):
            raise ValueError("nats_url is required with --event-plane nats")
        for name in ("etcd", "nats"):
            if bool(getattr(self, f"{name}_cert")) != bool(getattr(self, f"{name}_key")):
                raise ValueError(f"{name}_cert and {name}_key go together")
        _check_positive("nats_kv_max_msgs", self.nats_kv_max_msgs)
        if self.nats_kv_max_age < 0:
            raise ValueError(f"nats_kv_max_age must be >= 0; got {self.nats_kv_max_age}")


@dataclass(frozen=True)
class RouterConfig:
    """Knobs of the KV-aware modes (DESIGN §4) and of session affinity / replica sync."""

    overlap_score_weight: float = opt(
        1.0, "kv mode: weight of prefill blocks against decode blocks", flag="--kv-overlap-score-weight"
    )
    temperature: float = opt(0.0, "kv modes: softmax sampling temperature (0 = argmin)", flag="--router-temperature")
    kv_events: bool = opt(True, "kv modes: index fed by worker KV events (off = approximate mode)")
    approx_ttl: float = opt(
        120.0, "approximate mode: seconds a routed prefix counts as cached", flag="--router-approx-ttl"
    )
    busy_decode_threshold: float = opt(0.0, "worker busy above this fraction of KV blocks active (0 = off)")
    busy_prefill_frac: float = opt(
        0.0, "worker busy above this multiple of max_num_batched_tokens queued for prefill (0 = off)"
    )
    queue_policy: QueuePolicy = opt(
        "fcfs", "admission queue order when all workers are busy", flag="--router-queue-policy"
    )
    max_queue: int = opt(1024, "queued requests past this are refused with 503", flag="--router-max-queue")
    queue_timeout: float = opt(60.0, "seconds a request may wait for a free worker", flag="--router-queue-timeout")
    session_ttl: float = opt(600.0, "seconds a session (x-session-id) stays bound to its worker")
    replica_sync: bool = opt(True, "share active load with other frontends (event plane)", flag="--router-replica-sync")
    session_affinity: bool = opt(
        True, "keep requests with the same x-session-id on one worker (off: the header is ignored, as in Dynamo)"
    )

    def __post_init__(self) -> None:
        check_choices(self)
        for name in ("overlap_score_weight", "temperature", "busy_decode_threshold", "busy_prefill_frac", "max_queue"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)}")
        for name in ("approx_ttl", "queue_timeout", "session_ttl"):
            _check_positive(name, getattr(self, name))


@dataclass(frozen=True)
class AuthConfig:
    """The front door: API keys, per-key rate limits, TLS (frontend/auth.py, rate_limit.py)."""

    api_key: str = opt("", "require 'Authorization: Bearer KEY' with this key ('' = no key needed)")
    api_keys_file: str = opt("", "file of API keys, one per line: KEY [name=NAME] [rpm=N] [tpm=N]")
    rate_limit_rpm: float = opt(0.0, "requests per minute per API key (0 = unlimited)")
    rate_limit_tpm: float = opt(0.0, "prompt + completion tokens per minute per API key (0 = unlimited)")
    public_health: bool = opt(False, "with API keys: /health answers without a key (for probes)")
    public_metrics: bool = opt(False, "with API keys: /metrics answers without a key (for scrapers)")
    tls_cert: str = opt("", "serve HTTPS with this certificate chain (PEM); needs --tls-key")
    tls_key: str = opt("", "private key (PEM) of --tls-cert")

    def __post_init__(self) -> None:
        for name in ("rate_limit_rpm", "rate_limit_tpm"):
            value = getattr(self, name)
            if not value >= 0 or value == float("inf"):
                raise ValueError(f"{name} must be a finite number >= 0; got {value}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        limited = self.rate_limit_rpm > 0 or self.rate_limit_tpm > 0
        if limited and not self.keys_enabled:
            raise ValueError("rate limits are per API key: give --api-key or --api-keys-file")

    @property
    def keys_enabled(self) -> bool:
        return bool(self.api_key or self.api_keys_file)


@dataclass(frozen=True)
class DisaggOptions:
    """Frontend: disaggregated prefill (DESIGN §6), in effect while prefill workers exist."""

    conditional: bool = opt(
        True,
        "prefill on the decode worker when the uncached prompt is small or every prefill worker is busy "
        "(off: on a prefill worker whenever one exists)",
        flag="--conditional-disagg",
    )
    max_local_prefill_tokens: int = opt(
        2048,
        "conditional disagg: prefill locally when fewer prompt tokens than this are uncached on the decode worker",
        flag="--max-local-prefill-tokens",
    )
    max_local_prefill_frac: float = opt(
        0.7,
        "conditional disagg: ... and when less than this fraction of the prompt is uncached there",
        flag="--max-local-prefill-frac",
    )
    prefill_busy_frac: float = opt(
        2.0,
        "conditional disagg: a prefill worker is busy with more than this multiple of its max_num_batched_tokens "
        "queued (0 = never busy)",
        flag="--prefill-busy-frac",
    )

    def __post_init__(self) -> None:
        if self.max_local_prefill_tokens < 0:
            raise ValueError(f"max_local_prefill_tokens must be >= 0; got {self.max_local_prefill_tokens}")
        if not 0.0 <= self.max_local_prefill_frac <= 1.0:
            raise ValueError(f"max_local_prefill_frac must be in [0, 1]; got {self.max_local_prefill_frac}")
        if self.prefill_busy_frac < 0:
            raise ValueError(f"prefill_busy_frac must be >= 0; got {self.prefill_busy_frac}")


@dataclass(frozen=True)
class KvTransferOptions:
    """Worker: disaggregated KV hand-off. The mocker models a transfer as bytes / bandwidth with
    bytes per token = 2 (K, V) x layers x KV heads x head dim x dtype bytes (defaults: an 8B
    Llama in bf16, 128 KiB per token)."""

    bandwidth: float = opt(
        25e9, "mocker: modelled KV transfer bandwidth, bytes per second", flag="--kv-transfer-bandwidth"
    )
    timeout: float = opt(
        30.0,
        "prefill worker: seconds pinned KV blocks wait for their pull before they are freed",
        flag="--kv-transfer-timeout",
    )
    num_layers: int = opt(32, "mocker: model layers, for KV bytes per token", flag="--mocker-num-layers")
    num_kv_heads: int = opt(8, "mocker: KV heads, for KV bytes per token", flag="--mocker-num-kv-heads")
    head_dim: int = opt(128, "mocker: head dimension, for KV bytes per token", flag="--mocker-head-dim")
    dtype_bytes: int = opt(2, "mocker: bytes per KV element, for KV bytes per token", flag="--mocker-kv-dtype-bytes")

    def __post_init__(self) -> None:
        for name in ("bandwidth", "timeout", "num_layers", "num_kv_heads", "head_dim", "dtype_bytes"):
            _check_positive(f"kv transfer {name}", getattr(self, name))

    @property
    def mocker_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes


@dataclass(frozen=True)
class FrontendConfig:
    host: str = opt("127.0.0.1", "HTTP listen address")
    port: int = opt(8000, "HTTP port")
    router_mode: RouterMode = opt("round-robin", "how to pick a worker")
    planes: PlaneConfig = PlaneConfig()
    max_body_bytes: int = opt(8 * 1024 * 1024, "largest accepted request body")
    http_header_timeout: float = opt(10.0, "seconds a connection has to send a complete request head")
    http_body_timeout: float = opt(60.0, "seconds a request has to send its body once its head is in (then 408)")
    http_keepalive_timeout: float = opt(15.0, "seconds an idle keep-alive connection stays open")
    max_connections: int = opt(8192, "open HTTP connections (per frontend process) past this get a 503 and are closed")
    processes: int = opt(1, "frontend processes sharing the port (SO_REUSEPORT)", flag="--frontend-processes")
    migration_limit: int = opt(0, "times a request may move to another worker if its worker dies")
    served_model_name: str = opt("", "name clients see for the workers' model ('' = the name workers register)")
    router: RouterConfig = RouterConfig()
    drain_timeout: float = opt(DRAIN_TIMEOUT_S, DRAIN_HELP)
    auth: AuthConfig = AuthConfig()
    advertise_host: str = opt("", ADVERTISE_HELP, flag="--advertise-host")
    disagg: DisaggOptions = DisaggOptions()
    # Not the HTTP --host: a public API address must not also expose router-sync traffic.
    cluster_host: str = opt(
        "127.0.0.1", "listen address of the frontend's internal planes (router replica sync publisher)"
    )

    def __post_init__(self) -> None:
        check_choices(self)
        _check_drain(self.drain_timeout)
        _check_port("port", self.port)
        _check_positive("max_body_bytes", self.max_body_bytes)
        for name in ("http_header_timeout", "http_body_timeout", "http_keepalive_timeout", "max_connections"):
            _check_positive(name, getattr(self, name))
        _check_positive("processes", self.processes)
        if self.migration_limit < 0:
            raise ValueError(f"migration_limit must be >= 0; got {self.migration_limit}")


@dataclass(frozen=True)
class WorkerConfig:
    engine: EngineKind = opt("native", "engine: native (PyTorch model) or mocker (simulated)")
    model: str = opt("", "model folder, .gguf file or packaged model name ('' = SmolLM2-135M-Instruct)")
    served_model_name: str = opt("", "name clients use (default: the model's name)")
    role: Role = opt("agg", "worker role")
    host: str = opt("127.0.0.1", "request-plane listen address", flag="--worker-host")
    port: int = opt(0, "request-plane port (0 = ephemeral)", flag="--worker-port")
    planes: PlaneConfig = PlaneConfig()
    block_size: int = opt(64, "tokens per KV block")
    num_gpu_blocks: int = opt(0, "KV cache size in blocks (0 = mocker 16384, native from --kv-cache-gb)")
    max_num_seqs: int = opt(256, "max sequences per step")
    max_num_batched_tokens: int = opt(8192, "token budget per step")
    max_model_len: int = opt(0, "context length (0 = the model's)")
    speedup_ratio: float = opt(1.0, "mocker: divide modelled step times by this")
    kv_cache_gb: float = opt(0.0, "native engine: KV cache size in GB when --num-gpu-blocks is 0 (0 = 2 GB)")
    dtype: Dtype = opt(
        "auto",
        "native engine weights/KV dtype (auto: bfloat16 on CUDA; on CPU the faster of float32 and "
        "bfloat16 for this CPU: bfloat16 with AMX, float32 without native bf16, else a short probe "
        "timing both; bfloat16 asked on a CPU without native bf16 is converted to float32)",
    )
    enable_prefix_caching: bool = opt(True, "reuse KV blocks of shared prefixes")
    metrics_interval: float = opt(0.5, "seconds between load-metrics publications")
    seed: int = opt(0, "engine random seed")
    drain_timeout: float = opt(DRAIN_TIMEOUT_S, DRAIN_HELP)
    advertise_host: str = opt("", ADVERTISE_HELP, flag="--advertise-host")
    kv_transfer: KvTransferOptions = KvTransferOptions()
    health_port: int = opt(0, "HTTP port of the worker's /live and /health probes (0 = none)")

    def __post_init__(self) -> None:
        check_choices(self)
        _check_drain(self.drain_timeout)
        _check_port("worker port", self.port)
        _check_port("health port", self.health_port)
        if self.num_gpu_blocks < 0:
            raise ValueError(f"num_gpu_blocks must be >= 0; got {self.num_gpu_blocks}")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            _check_positive(name, getattr(self, name))
        _check_positive("speedup_ratio", self.speedup_ratio)
        _check_positive("metrics_interval", self.metrics_interval)
        if self.max_model_len < 0 or self.kv_cache_gb < 0:
            raise ValueError("max_model_len and kv_cache_gb must be >= 0")


PlannerModeKind = Literal["throughput", "load"]


@dataclass(frozen=True)
class PlannerOptions:
    """The SLA planner (DESIGN §7), in `serve --planner` or the `lightspeed planner` process."""

    enabled: bool = opt(False, "serve: run the SLA planner in-process; it scales the workers", flag="--planner")
    mode: PlannerModeKind = opt("throughput", "planner: size from the step-time model, or +-1 on latency")
    predictor: str = opt("constant", "planner: load predictor (constant, moving-average, kalman, arima)")
    adjustment_interval: float = opt(60.0, "planner: seconds between decisions")
    ttft_slo: float = opt(2.0, "planner: time-to-first-token target, seconds (wall time of this fleet)")
    itl_slo: float = opt(0.05, "planner: inter-token latency target, seconds (wall time of this fleet)")
    min_workers: int = opt(1, "planner: fewest workers")
    max_workers: int = opt(8, "planner: most workers (the budget)")
    perf_model: str = opt("", "planner: PerfModel JSON file ('' = the model the workers publish)")
    decision_log: str = opt("", "planner: append each decision as a JSON line to this file ('' = none)")
    metrics_port: int = opt(0, "planner: serve the planner's /metrics on this port (0 = none)")
    dry_run: bool = opt(False, "planner: log decisions only, never scale")
    target_utilization: float = opt(
        1.0, "planner, throughput mode: the busy fraction a worker is sized for (< 1: headroom for bursts)"
    )

    def __post_init__(self) -> None:
        check_choices(self)
        if not 0 < self.target_utilization <= 1:
            raise ValueError(f"target_utilization must be in (0, 1]; got {self.target_utilization}")
        _check_positive("adjustment_interval", self.adjustment_interval)
        _check_positive("ttft_slo", self.ttft_slo)
        _check_positive("itl_slo", self.itl_slo)
        if not 1 <= self.min_workers <= self.max_workers:
            raise ValueError(f"need 1 <= min_workers <= max_workers; got {self.min_workers}, {self.max_workers}")
        _check_port("metrics_port", self.metrics_port)


@dataclass(frozen=True)
class ServeConfig:
    """`lightspeed serve`: one frontend plus N local workers under a supervisor."""

    frontend: FrontendConfig = FrontendConfig()
    worker: WorkerConfig = WorkerConfig()
    workers: int = opt(1, "number of worker processes")
    liveness_timeout: float = opt(
        30.0, "restart a child whose event loop has sent no heartbeat for this many seconds (0 = off)"
    )
    planner: PlannerOptions = PlannerOptions()
    disagg: str = opt("", "start x prefill + y decode workers instead of --workers aggregated ones, e.g. 1P1D")

    def __post_init__(self) -> None:
        _check_positive("workers", self.workers)
        if self.disagg:
            parse_disagg(self.disagg)
            if self.planner.enabled:
                raise ValueError("planner: --planner scales aggregated workers; it cannot be used with --disagg")
        if self.liveness_timeout < 0:
            raise ValueError(f"liveness_timeout must be >= 0; got {self.liveness_timeout}")
        if self.frontend.planes != self.worker.planes:
            raise ValueError("frontend and workers must share discovery and event-plane settings")


def parse_disagg(spec: str) -> tuple[int, int]:
    """`xPyD` -> (x prefill workers, y decode workers); ValueError naming the flag otherwise."""
    match = re.fullmatch(r"(\d+)[Pp](\d+)[Dd]", spec.strip())
    if match is None or int(match[1]) < 1 or int(match[2]) < 1:
        raise ValueError(f"disagg must look like 1P1D (x prefill, y decode workers, each >= 1); got {spec!r}")
    return int(match[1]), int(match[2])


AnyConfig = ServeConfig | FrontendConfig | WorkerConfig


def encode_config(cfg: AnyConfig) -> str:
    """The config as one JSON value, how `serve` hands a child process its configuration."""
    return msgspec.json.encode(cfg).decode()


def decode_config(raw: str | bytes, cls: type[_T]) -> _T:
    """Rebuild (and re-validate) the exact frozen config `encode_config` wrote."""
    return msgspec.json.decode(raw, type=cls)
