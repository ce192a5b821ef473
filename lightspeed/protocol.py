"""Wire types shared across process boundaries.

Every message that crosses a process (frontend -> worker over the request plane, worker ->
router over the event plane, worker -> discovery) is one of these msgspec Structs. Keeping them
in one module makes the protocol reviewable in one place and lets each side decode with a typed
decoder instead of poking at dicts.
"""

from __future__ import annotations

import enum

import msgspec


class FinishReason(str, enum.Enum):
    """Why a sequence stopped. Values match OpenAI's `finish_reason` where one exists."""

    STOP = "stop"  # EOS or a stop token id / stop string
    LENGTH = "length"  # max_tokens or context length reached
    CANCELLED = "cancelled"  # client went away / aborted
    ERROR = "error"


class SamplingOptions(msgspec.Struct, frozen=True, omit_defaults=True):
    """How to pick the next token. None means the engine default (greedy for temperature)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    logprobs: int | None = None  # number of top logprobs to return per token; 0 = only the chosen
    presence_penalty: float | None = None
    frequency_penalty: float | None = None


# The most stop token ids one request may carry. Real lists name a handful of end-of-turn ids;
# a list covering much of the vocabulary only serves to make min_tokens sampling search for the
# few ids left, so the frontend and the engine both refuse longer lists.
MAX_STOP_TOKEN_IDS = 256


class StopConditions(msgspec.Struct, frozen=True, omit_defaults=True):
    """When the engine must stop generating. Stop *strings* are applied by the frontend."""

    max_tokens: int | None = None
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    min_tokens: int = 0


class KvTransferParams(msgspec.Struct, frozen=True, omit_defaults=True):
    """Disaggregated prefill -> decode hand-off (DESIGN §6).

    Frontend -> prefill worker: `do_remote_decode` (compute the prompt, sample the first token,
    keep the prompt's KV blocks pinned). Prefill worker -> frontend -> decode worker: where the
    pinned blocks are, which they are and what they hold, so the decode worker pulls only the
    blocks it does not cache and then releases them (`kv_release` on `control_address`).
    """

    do_remote_decode: bool = False
    transfer_id: str = ""  # the prefill worker's key for the pinned blocks
    prefill_worker: str = ""  # its instance id
    control_address: str = ""  # its request plane ("host:port"): kv_release
    # The KV byte channel's own coordinates, msgpack-encoded by the channel for the channel
    # (b"" = mocker: the transfer is a modelled delay); opaque to the frontend.
    channel: bytes = b""
    block_ids: list[int] = []  # block-table order
    block_hashes: list[int] = []  # sequence hashes of the full blocks among them
    num_tokens: int = 0  # prompt tokens whose KV the blocks hold
    block_size: int = 0
    kv_bytes_per_token: int = 0  # K+V bytes of one token across all layers


class KvRelease(msgspec.Struct, frozen=True):
    """Decode worker -> prefill worker (`kv_release`): the pinned blocks may be freed."""

    transfer_id: str


class PreprocessedRequest(msgspec.Struct, frozen=True, omit_defaults=True):
    """A tokenized request as the frontend sends it to a worker's `generate` endpoint."""

    request_id: str
    model: str
    token_ids: list[int]
    sampling: SamplingOptions = SamplingOptions()
    stop: StopConditions = StopConditions()
    eos_token_ids: list[int] = []
    lora_name: str | None = None
    # Disaggregation hand-off (filled by a prefill worker, consumed by a decode worker).
    kv_transfer_params: KvTransferParams | None = None


class TopLogprob(msgspec.Struct, frozen=True, array_like=True):
    token_id: int
    logprob: float


class TokenLogprob(msgspec.Struct, frozen=True, array_like=True):
    """Logprob of the sampled token and the top alternatives at that position."""

    token_id: int
    logprob: float
    top: list[TopLogprob] = []


class LLMEngineOutput(msgspec.Struct, frozen=True, omit_defaults=True):
    """One streamed delta from a worker: new token ids, and on the last frame a finish reason.

    `num_cached_tokens` is set on the first frame (prefix-cache hit of the prompt) so the
    frontend can report `usage.prompt_tokens_details.cached_tokens`.
    """

    token_ids: list[int] = []
    finish_reason: FinishReason | None = None
    num_cached_tokens: int | None = None
    logprobs: list[TokenLogprob] | None = None
    error: str | None = None
    kv_transfer_params: KvTransferParams | None = None


# ---------------------------------------------------------------- KV events (event plane)


class StoredBlock(msgspec.Struct, frozen=True, array_like=True):
    block_hash: int  # sequence hash (names the whole prefix up to and including this block)
    tokens_hash: int  # local hash of this block's tokens only


class KvStored(msgspec.Struct, frozen=True, tag="stored"):
    blocks: list[StoredBlock]
    parent_hash: int | None = None


class KvRemoved(msgspec.Struct, frozen=True, tag="removed"):
    block_hashes: list[int]


class KvCleared(msgspec.Struct, frozen=True, tag="cleared"):
    pass


KvEventData = KvStored | KvRemoved | KvCleared


class StorageTier(str, enum.Enum):
    DEVICE = "device"
    HOST = "host"
    DISK = "disk"


class KvEvent(msgspec.Struct, frozen=True):
    """A change to a worker's prefix cache. `event_id` is monotonic per worker so a subscriber
    can detect gaps and ask the worker for a full dump."""

    worker_id: str
    event_id: int
    data: KvEventData
    dp_rank: int = 0
    storage_tier: StorageTier = StorageTier.DEVICE


class LoadMetrics(msgspec.Struct, frozen=True):
    """Periodic load snapshot a worker publishes (topic `load-metrics`)."""

    worker_id: str
    num_running: int
    num_waiting: int
    kv_active_blocks: int
    kv_total_blocks: int
    kv_cached_blocks: int = 0
    prefix_hit_rate: float = 0.0
    timestamp: float = 0.0
    # Step clock (engine/step_clock.py): busy wall and modelled seconds since start, the current
    # busy period's lag (wall - modelled) and the largest lag since the previous snapshot.
    step_wall_seconds: float = 0.0
    step_modelled_seconds: float = 0.0
    step_lag_seconds: float = 0.0
    step_lag_max_seconds: float = 0.0
    num_preemptions: int = 0  # requests preempted (KV exhausted) since the worker started


class ForwardPassMetrics(msgspec.Struct, frozen=True):
    """One engine step as the planner sees it (topic `forward-pass-metrics`)."""

    worker_id: str
    num_prefill_tokens: int
    num_decode_tokens: int
    num_seqs: int
    step_seconds: float
    kv_usage: float


# ---------------------------------------------------------------- discovery


class WorkerRole(str, enum.Enum):
    AGG = "agg"
    PREFILL = "prefill"
    DECODE = "decode"


class PerfModel(msgspec.Struct, frozen=True, omit_defaults=True):
    """A worker's step-time model: the one the mocker sleeps by, the router prices with, the
    planner sizes with, and a real worker fits from its measured steps and publishes on its card.

    Step milliseconds = prefill(t) + decode(p), with prefill(t) = a*t^2 + b*t + c for t
    uncached tokens in the step (0 when t = 0) and decode(p) = max(floor, d*p^2 + e*p + f) at
    KV usage p (active KV blocks / total), the decode phase counted only when the step emits
    tokens. `prefill_ms`, `decode_ms` and `step_ms` are in the model's reference milliseconds;
    wall time divides by `speedup_ratio` (`wall_seconds`). `dynamo_default` is Dynamo's mocker
    fit (DESIGN §5), the model of a worker that publishes none.
    """

    prefill_coeffs: tuple[float, float, float]
    decode_coeffs: tuple[float, float, float]
    decode_floor_ms: float = 1.0
    speedup_ratio: float = 1.0

    @classmethod
    def dynamo_default(cls, speedup_ratio: float = 1.0) -> PerfModel:
        return cls(_DYNAMO_PREFILL, _DYNAMO_DECODE, 1.0, speedup_ratio)

    def prefill_ms(self, tokens: int) -> float:
        """Prefill phase of a step computing `tokens` uncached tokens (0 when there are none)."""
        if tokens <= 0:
            return 0.0
        a, b, c = self.prefill_coeffs
        return a * tokens * tokens + b * tokens + c

    def decode_ms(self, usage: float) -> float:
        """Decode phase of a step at KV usage `usage`."""
        d, e, f = self.decode_coeffs
        return max(self.decode_floor_ms, d * usage * usage + e * usage + f)

    def step_ms(self, prefill_tokens: int, usage: float, has_decode: bool) -> float:
        """Prefill phase then, when the step emits tokens, decode phase."""
        total = self.prefill_ms(prefill_tokens)
        if has_decode:
            total += self.decode_ms(usage)
        return total

    def wall_seconds(self, ms: float) -> float:
        """Wall seconds of `ms` reference milliseconds on this worker."""
        return ms / 1000.0 / self.speedup_ratio


# Dynamo's polynomial fits (ms): prefill of t uncached tokens, t^2, t, 1; decode at KV usage p,
# p^2, p, 1 (DESIGN §5).
_DYNAMO_PREFILL = (4.209989e-7, 1.518344e-2, 16.50142)
_DYNAMO_DECODE = (-25.74, 54.01, 5.74)
DEFAULT_PERF_MODEL = PerfModel.dynamo_default()


class WorkerCard(msgspec.Struct, frozen=True, omit_defaults=True):
    """What a worker registers in discovery. The frontend builds its view of the fleet from these."""

    instance_id: str
    model: str  # served model name
    address: str  # request-plane address "host:port"
    role: WorkerRole = WorkerRole.AGG
    engine: str = "mocker"
    namespace: str = "lightspeed"
    component: str = "backend"
    endpoint: str = "generate"
    block_size: int = 64
    total_kv_blocks: int = 0
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    context_length: int = 8192
    model_path: str = ""  # local folder with tokenizer.json / tokenizer_config.json
    events_address: str = ""  # event-plane publisher address of this worker ("tcp://host:port")
    pid: int = 0
    perf: PerfModel | None = None  # step-time model for the predicted-latency router policy
    # HMAC of the card's other fields under the cluster secret (runtime/signed_discovery.py);
    # "" when the fleet runs without a secret.
    signature: str = ""


TOPIC_KV_EVENTS = "kv-events"
TOPIC_LOAD_METRICS = "load-metrics"
TOPIC_FORWARD_PASS = "forward-pass-metrics"
