from __future__ import annotations

from dataclasses import fields

import msgspec
import pytest

from lightspeed.config import (
    QUEUE_POLICIES,
    ROUTER_MODES,
    AuthConfig,
    DisaggOptions,
    FrontendConfig,
    KvTransferOptions,
    PlaneConfig,
    PlannerOptions,
    RouterConfig,
    ServeConfig,
    WorkerConfig,
    decode_config,
    encode_config,
)
from lightspeed.router.admission import QUEUE_POLICIES as ADMISSION_QUEUE_POLICIES


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"port": 70000}, "port must be in 0..65535; got 70000"),
        ({"router_mode": "magic"}, f"router_mode must be one of {', '.join(ROUTER_MODES)}; got 'magic'"),
        ({"processes": 0}, "processes must be > 0; got 0"),
        ({"migration_limit": -1}, "migration_limit must be >= 0; got -1"),
        ({"http_header_timeout": 0.0}, "http_header_timeout must be > 0; got 0.0"),
        ({"http_body_timeout": -1.0}, "http_body_timeout must be > 0; got -1.0"),
        ({"http_keepalive_timeout": 0.0}, "http_keepalive_timeout must be > 0; got 0.0"),
        ({"max_connections": 0}, "max_connections must be > 0; got 0"),
        ({"drain_timeout": -1.0}, "drain_timeout must be >= 0; got -1.0"),
    ],
)
def test_frontend_config_rejects(kw: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        FrontendConfig(**kw)
    assert str(err.value) == message


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"engine": "gpu"}, "engine must be one of mocker, native; got 'gpu'"),
        ({"role": "boss"}, "role must be one of agg, prefill, decode; got 'boss'"),
        ({"dtype": "int4"}, "dtype must be one of auto, float32, bfloat16, float16; got 'int4'"),
        ({"block_size": 0}, "block_size must be > 0; got 0"),
        ({"speedup_ratio": 0}, "speedup_ratio must be > 0; got 0"),
        ({"num_gpu_blocks": -1}, "num_gpu_blocks must be >= 0; got -1"),
        ({"max_num_seqs": 0}, "max_num_seqs must be > 0; got 0"),
        ({"port": -1}, "worker port must be in 0..65535; got -1"),
        ({"drain_timeout": -0.5}, "drain_timeout must be >= 0; got -0.5"),
    ],
)
def test_worker_config_rejects(kw: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        WorkerConfig(**kw)
    assert str(err.value) == message


def test_router_config_rejects_an_unknown_queue_policy() -> None:
    with pytest.raises(ValueError, match=r"^queue_policy must be one of fcfs, wspt; got 'random'$"):
        RouterConfig(queue_policy="random")  # type: ignore[arg-type]


def test_queue_policies_are_declared_once() -> None:
    assert ADMISSION_QUEUE_POLICIES is QUEUE_POLICIES
    assert QUEUE_POLICIES == ("fcfs", "wspt")


def test_plane_config_rejects_unknown_discovery() -> None:
    with pytest.raises(ValueError, match=r"^discovery must be one of mem, file, etcd; got 'zookeeper'$"):
        PlaneConfig(discovery="zookeeper")  # type: ignore[arg-type]


def test_serve_config_rejects_a_negative_liveness_timeout() -> None:
    with pytest.raises(ValueError, match=r"^liveness_timeout must be >= 0; got -1.0$"):
        ServeConfig(liveness_timeout=-1.0)


def test_serve_config_requires_shared_planes() -> None:
    with pytest.raises(ValueError, match="share discovery"):
        ServeConfig(FrontendConfig(planes=PlaneConfig(discovery="mem")), WorkerConfig(), 1)


def test_the_user_visible_engine_default_is_the_dataclass_default() -> None:
    assert WorkerConfig().engine == "native"


@pytest.mark.parametrize("cls", [PlaneConfig, RouterConfig, FrontendConfig, WorkerConfig, ServeConfig])
def test_every_option_carries_help(cls: type) -> None:
    for f in fields(cls):
        nested = f.name in ("planes", "router", "frontend", "worker", "auth", "disagg", "kv_transfer", "planner")
        nested = nested and f.type not in ("str", str)  # ServeConfig.disagg is a plain option
        assert nested or f.metadata["help"], f"{cls.__name__}.{f.name}"


NON_DEFAULT_PLANES = PlaneConfig(
    discovery="mem",
    discovery_path="/tmp/d",
    discovery_ttl=2.5,
    event_plane="nats",
    namespace="ns",
    etcd_endpoints="http://e:2379",
    etcd_user="eu",
    etcd_password="ep",
    etcd_ca="eca.pem",
    etcd_cert="ec.pem",
    etcd_key="ek.pem",
    nats_url="nats://n:4222",
    nats_user="nu",
    nats_password="np",
    nats_creds="n.creds",
    nats_ca="nca.pem",
    nats_cert="nc.pem",
    nats_key="nk.pem",
    nats_kv_max_msgs=10,
    nats_kv_max_age=60.0,
    cluster_secret="a-cluster-secret-of-24c",
)
NON_DEFAULT_SERVE = ServeConfig(
    FrontendConfig(
        host="0.0.0.0",
        port=9123,
        router_mode="kv-latency",
        planes=NON_DEFAULT_PLANES,
        max_body_bytes=1234,
        http_header_timeout=4.5,
        http_body_timeout=5.5,
        http_keepalive_timeout=6.5,
        max_connections=77,
        processes=3,
        migration_limit=2,
        served_model_name="front",
        router=RouterConfig(0.1, 0.3, False, 7.5, 0.9, 1.5, "wspt", 12, 0.2, 3.25, False, False),
        drain_timeout=3.5,
        auth=AuthConfig("sk-key-0001", "/k.txt", 60.0, 1000.0, True, True, "c.pem", "k.pem"),
        advertise_host="front.example",
        disagg=DisaggOptions(False, 512, 0.5, 1.5),
        cluster_host="10.0.0.2",
    ),
    WorkerConfig(
        engine="mocker",
        model="/models/x",
        served_model_name="x",
        role="decode",
        host="10.0.0.1",
        port=4567,
        planes=NON_DEFAULT_PLANES,
        block_size=16,
        num_gpu_blocks=99,
        max_num_seqs=7,
        max_num_batched_tokens=333,
        max_model_len=1000,
        speedup_ratio=12.5,
        kv_cache_gb=0.1,
        dtype="bfloat16",
        enable_prefix_caching=False,
        metrics_interval=0.3,
        seed=42,
        drain_timeout=2.0,
        advertise_host="10.0.0.9",
        kv_transfer=KvTransferOptions(1e9, 5.0, 30, 3, 64, 4),
        health_port=9090,
    ),
    workers=4,
    liveness_timeout=12.0,
    planner=PlannerOptions(False, "load", "kalman", 10.0, 1.0, 0.02, 2, 6, "/p.json", "/d.jsonl", 9091, True, 0.8),
    disagg="1P2D",
)


@pytest.mark.parametrize(
    ("cfg", "cls"),
    [
        (NON_DEFAULT_SERVE, ServeConfig),
        (NON_DEFAULT_SERVE.frontend, FrontendConfig),
        (NON_DEFAULT_SERVE.worker, WorkerConfig),
        (ServeConfig(), ServeConfig),
        (FrontendConfig(), FrontendConfig),
        (WorkerConfig(), WorkerConfig),
    ],
)
def test_config_round_trips_through_json(cfg: object, cls: type) -> None:
    back = decode_config(encode_config(cfg), cls)  # type: ignore[arg-type]
    assert type(back) is cls
    assert back == cfg
    assert encode_config(back) == encode_config(cfg)  # type: ignore[arg-type]


def test_the_non_default_fixture_really_differs_everywhere() -> None:
    # The round trip above only proves something for fields that differ from their defaults.
    def leaves(obj: object, prefix: str = "") -> dict[str, object]:
        out: dict[str, object] = {}
        for f in fields(obj):  # type: ignore[arg-type]
            value = getattr(obj, f.name)
            if hasattr(value, "__dataclass_fields__"):
                out |= leaves(value, f"{prefix}{f.name}.")
            else:
                out[prefix + f.name] = value
        return out

    changed, default = leaves(NON_DEFAULT_SERVE), leaves(ServeConfig())
    same = sorted(k for k in changed if changed[k] == default[k])
    # --planner cannot go with --disagg (a ValueError); its own round trip is below.
    assert same == ["planner.enabled"]
    planned = ServeConfig(planner=PlannerOptions(enabled=True))
    assert decode_config(encode_config(planned), ServeConfig) == planned


def test_decoding_validates_like_construction() -> None:
    raw = encode_config(WorkerConfig()).replace('"block_size":64', '"block_size":0')
    with pytest.raises(msgspec.ValidationError, match="block_size must be > 0"):
        decode_config(raw, WorkerConfig)
