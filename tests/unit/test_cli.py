"""The generated CLI: every flag's field, default and env var; value precedence; config files;
booleans; --version / --log-level; the config hand-off from serve to its children."""

from __future__ import annotations

import importlib.metadata
import logging
from pathlib import Path
from typing import Any

import pytest

from lightspeed.cli import COMMANDS, CONFIG_FILE_ENV, main, parse_invocation
from lightspeed.config import CHILD_CONFIG_ENV, FrontendConfig, ServeConfig, WorkerConfig, encode_config
from lightspeed.options import FlagSpec
from lightspeed.serve import child_spec

PLANES = {
    "--discovery": ("planes.discovery", "file"),
    "--discovery-path": ("planes.discovery_path", ""),
    "--discovery-ttl": ("planes.discovery_ttl", 10.0),
    "--event-plane": ("planes.event_plane", "zmq"),
    "--namespace": ("planes.namespace", "lightspeed"),
    "--cluster-secret": ("planes.cluster_secret", ""),
    "--etcd-endpoints": ("planes.etcd_endpoints", ""),
    "--etcd-user": ("planes.etcd_user", ""),
    "--etcd-password": ("planes.etcd_password", ""),
    "--etcd-ca": ("planes.etcd_ca", ""),
    "--etcd-cert": ("planes.etcd_cert", ""),
    "--etcd-key": ("planes.etcd_key", ""),
    "--nats-url": ("planes.nats_url", ""),
    "--nats-user": ("planes.nats_user", ""),
    "--nats-password": ("planes.nats_password", ""),
    "--nats-creds": ("planes.nats_creds", ""),
    "--nats-ca": ("planes.nats_ca", ""),
    "--nats-cert": ("planes.nats_cert", ""),
    "--nats-key": ("planes.nats_key", ""),
    "--nats-kv-max-msgs": ("planes.nats_kv_max_msgs", 100_000),
    "--nats-kv-max-age": ("planes.nats_kv_max_age", 86400.0),
}
ADVERTISE = {"--advertise-host": ("advertise_host", "")}  # frontend and worker: serve sets both
DRAIN = {"--drain-timeout": ("drain_timeout", 10.0)}  # frontend and worker: serve sets both
FRONTEND = {
    "--host": ("host", "127.0.0.1"),
    "--port": ("port", 8000),
    "--router-mode": ("router_mode", "round-robin"),
    "--max-body-bytes": ("max_body_bytes", 8 * 1024 * 1024),
    "--http-header-timeout": ("http_header_timeout", 10.0),
    "--http-body-timeout": ("http_body_timeout", 60.0),
    "--http-keepalive-timeout": ("http_keepalive_timeout", 15.0),
    "--max-connections": ("max_connections", 8192),
    "--frontend-processes": ("processes", 1),
    "--migration-limit": ("migration_limit", 0),
    "--kv-overlap-score-weight": ("router.overlap_score_weight", 1.0),
    "--router-temperature": ("router.temperature", 0.0),
    "--kv-events": ("router.kv_events", True),
    "--router-approx-ttl": ("router.approx_ttl", 120.0),
    "--busy-decode-threshold": ("router.busy_decode_threshold", 0.0),
    "--busy-prefill-frac": ("router.busy_prefill_frac", 0.0),
    "--router-queue-policy": ("router.queue_policy", "fcfs"),
    "--router-max-queue": ("router.max_queue", 1024),
    "--router-queue-timeout": ("router.queue_timeout", 60.0),
    "--session-affinity": ("router.session_affinity", True),
    "--session-ttl": ("router.session_ttl", 600.0),
    "--router-replica-sync": ("router.replica_sync", True),
    "--api-key": ("auth.api_key", ""),
    "--api-keys-file": ("auth.api_keys_file", ""),
    "--rate-limit-rpm": ("auth.rate_limit_rpm", 0.0),
    "--rate-limit-tpm": ("auth.rate_limit_tpm", 0.0),
    "--public-health": ("auth.public_health", False),
    "--public-metrics": ("auth.public_metrics", False),
    "--tls-cert": ("auth.tls_cert", ""),
    "--tls-key": ("auth.tls_key", ""),
    "--cluster-host": ("cluster_host", "127.0.0.1"),
    "--conditional-disagg": ("disagg.conditional", True),
    "--max-local-prefill-tokens": ("disagg.max_local_prefill_tokens", 2048),
    "--max-local-prefill-frac": ("disagg.max_local_prefill_frac", 0.7),
    "--prefill-busy-frac": ("disagg.prefill_busy_frac", 2.0),
}
WORKER = {
    "--engine": ("engine", "native"),
    "--model": ("model", ""),
    "--served-model-name": ("served_model_name", ""),
    "--block-size": ("block_size", 64),
    "--num-gpu-blocks": ("num_gpu_blocks", 0),
    "--kv-cache-gb": ("kv_cache_gb", 0.0),
    "--dtype": ("dtype", "auto"),
    "--max-num-seqs": ("max_num_seqs", 256),
    "--max-num-batched-tokens": ("max_num_batched_tokens", 8192),
    "--max-model-len": ("max_model_len", 0),
    "--speedup-ratio": ("speedup_ratio", 1.0),
    "--enable-prefix-caching": ("enable_prefix_caching", True),
    "--metrics-interval": ("metrics_interval", 0.5),  # new: had no flag
    "--seed": ("seed", 0),
    "--kv-transfer-bandwidth": ("kv_transfer.bandwidth", 25e9),
    "--kv-transfer-timeout": ("kv_transfer.timeout", 30.0),
    "--mocker-num-layers": ("kv_transfer.num_layers", 32),
    "--mocker-num-kv-heads": ("kv_transfer.num_kv_heads", 8),
    "--mocker-head-dim": ("kv_transfer.head_dim", 128),
    "--mocker-kv-dtype-bytes": ("kv_transfer.dtype_bytes", 2),
}


def _under(prefix: str, table: dict[str, tuple[str, Any]]) -> dict[str, tuple[tuple[str, ...], Any]]:
    return {flag: ((prefix + path,), default) for flag, (path, default) in table.items()}


def _both(table: dict[str, tuple[str, Any]]) -> dict[str, tuple[tuple[str, ...], Any]]:
    return {flag: (("frontend." + path, "worker." + path), default) for flag, (path, default) in table.items()}


# flag -> (the dotted config fields it sets, its default), exactly; every other flag is an error.
EXPECTED: dict[str, dict[str, tuple[tuple[str, ...], Any]]] = {
    "frontend": {
        **_under("", FRONTEND),
        **_under("", PLANES),
        **_under("", DRAIN),
        **_under("", ADVERTISE),
        "--served-model-name": (("served_model_name",), ""),  # new: the field had no flag
    },
    "worker": {
        **_under("", WORKER),
        **_under("", PLANES),
        **_under("", DRAIN),
        **_under("", ADVERTISE),
        "--role": (("role",), "agg"),
        "--worker-host": (("host",), "127.0.0.1"),
        "--worker-port": (("port",), 0),  # new: the field had no flag
        "--health-port": (("health_port",), 0),  # serve's workers get none (several per host)
    },
    "serve": {
        **_under("frontend.", FRONTEND),
        **_under("worker.", WORKER),
        **_both(PLANES),  # one flag, both configs: serve requires them equal
        **_both(DRAIN),
        **_both(ADVERTISE),
        "--workers": (("workers",), 1),
        "--liveness-timeout": (("liveness_timeout",), 30.0),
        # serve --planner: the SLA planner in-process (config.PlannerOptions)
        "--planner": (("planner.enabled",), False),
        "--mode": (("planner.mode",), "throughput"),
        "--predictor": (("planner.predictor",), "constant"),
        "--adjustment-interval": (("planner.adjustment_interval",), 60.0),
        "--ttft-slo": (("planner.ttft_slo",), 2.0),
        "--itl-slo": (("planner.itl_slo",), 0.05),
        "--min-workers": (("planner.min_workers",), 1),
        "--max-workers": (("planner.max_workers",), 8),
        "--perf-model": (("planner.perf_model",), ""),
        "--decision-log": (("planner.decision_log",), ""),
        "--metrics-port": (("planner.metrics_port",), 0),
        "--target-utilization": (("planner.target_utilization",), 1.0),
        "--disagg": (("disagg",), ""),
        "--dry-run": (("planner.dry_run",), False),
    },
}


# Flags whose generic other value is not a valid one.
OTHER: dict[str, Any] = {"--disagg": "1P1D", "--target-utilization": 0.5}
# Flags whose other value is refused on its own: rate limits need an API key, TLS a cert and a key.
NEEDS = {
    "--rate-limit-rpm": ["--api-key", "sk-some-key"],
    "--rate-limit-tpm": ["--api-key", "sk-some-key"],
    "--tls-cert": ["--tls-key", "k.pem"],
    "--tls-key": ["--tls-cert", "c.pem"],
    "--event-plane": ["--nats-url", "nats://n:4222"],  # the other choice is nats
    "--etcd-cert": ["--etcd-key", "k.pem"],
    "--etcd-key": ["--etcd-cert", "c.pem"],
    "--nats-cert": ["--nats-key", "k.pem"],
    "--nats-key": ["--nats-cert", "c.pem"],
}


def specs(command: str) -> dict[str, FlagSpec]:
    return {s.flag: s for s in COMMANDS[command].specs()}


def field_at(cfg: Any, dotted: str) -> Any:
    for name in dotted.split("."):
        cfg = getattr(cfg, name)
    return cfg


def other_value(spec: FlagSpec) -> Any:
    """A valid value different from the default."""
    if spec.choices:
        return next((c for c in spec.choices if c != spec.default), spec.default)
    if spec.hint is bool:
        return not spec.default
    if spec.hint is str:
        return f"x-{spec.key}-long-enough"  # secrets and keys have a minimum length
    return spec.default + (3 if spec.hint is int else 0.25)


def as_text(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


@pytest.mark.parametrize("command", ["serve", "frontend", "worker"])
def test_flags_map_to_exactly_these_fields_with_these_defaults(command: str) -> None:
    got = {flag: (tuple(".".join(p) for p in s.paths), s.default) for flag, s in specs(command).items()}
    assert got == EXPECTED[command]


@pytest.mark.parametrize("command", ["serve", "frontend", "worker"])
def test_defaults_are_the_config_defaults(command: str) -> None:
    inv = parse_invocation([command], environ={})
    assert inv.config == COMMANDS[command].config()
    for flag, (paths, default) in EXPECTED[command].items():
        for path in paths:
            assert field_at(inv.config, path) == default, flag


@pytest.mark.parametrize(
    ("command", "flag"), [(c, f) for c in ("serve", "frontend", "worker") for f in sorted(EXPECTED[c])]
)
def test_each_flag_and_its_env_var_set_their_fields(command: str, flag: str) -> None:
    spec = specs(command)[flag]
    value = OTHER.get(flag, other_value(spec))
    assert spec.env == "LIGHTSPEED_" + flag[2:].replace("-", "_").upper()
    needs = NEEDS.get(flag, [])  # flags valid only together with another
    from_flag = parse_invocation([command, *needs, flag, as_text(value)], environ={}).config
    from_env = parse_invocation([command, *needs], environ={spec.env: as_text(value)}).config
    for path in EXPECTED[command][flag][0]:
        assert field_at(from_flag, path) == value
        assert field_at(from_env, path) == value


def test_env_var_names_of_prefixed_flags() -> None:
    env = {"LIGHTSPEED_FRONTEND_PROCESSES": "2", "LIGHTSPEED_KV_OVERLAP_SCORE_WEIGHT": "0.5"}
    cfg = parse_invocation(["frontend"], environ=env).config
    assert isinstance(cfg, FrontendConfig)
    assert (cfg.processes, cfg.router.overlap_score_weight) == (2, 0.5)
    worker = parse_invocation(["worker"], environ={"LIGHTSPEED_WORKER_HOST": "10.1.2.3"}).config
    assert isinstance(worker, WorkerConfig) and worker.host == "10.1.2.3"


def test_flag_beats_environment_beats_file_beats_default(tmp_path: Path) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text("block-size: 16\nseed: 5\nmax_num_seqs: 9\nkv-events: false\n")
    env = {"LIGHTSPEED_BLOCK_SIZE": "32", "LIGHTSPEED_SEED": "6"}
    cfg = parse_invocation(["serve", "--config", str(path), "--block-size", "48"], environ=env).config
    assert isinstance(cfg, ServeConfig)
    assert cfg.worker.block_size == 48  # flag over environment and file
    assert cfg.worker.seed == 6  # environment over file
    assert cfg.worker.max_num_seqs == 9  # file (underscores accepted) over default
    assert cfg.frontend.router.kv_events is False
    assert cfg.worker.max_num_batched_tokens == 8192  # default


def test_config_file_can_come_from_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "w.yaml"
    path.write_text("engine: mocker\nlog-level: warning\n")
    inv = parse_invocation(["worker"], environ={CONFIG_FILE_ENV: str(path)})
    assert isinstance(inv.config, WorkerConfig)
    assert (inv.config.engine, inv.log_level) == ("mocker", "WARNING")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("blok-size: 16\n", "unknown option 'blok-size' for `lightspeed worker` (did you mean 'block-size'?)"),
        ("workers: 2\n", "unknown option 'workers' for `lightspeed worker`"),  # a serve option
        ("- 1\n- 2\n", "must hold a mapping of option: value"),
        ("block-size: 1.5\n", "invalid value 1.5 in config file option 'block-size'"),
        ("block-size: 0\n", "block_size must be > 0; got 0"),
        ("engine: gpu\n", "engine must be one of mocker, native; got 'gpu'"),
    ],
)
def test_bad_config_files_exit_2_with_a_clear_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, text: str, message: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with caplog.at_level(logging.ERROR, logger="lightspeed"):
        assert main(["worker", "--config", str(path)]) == 2
    [record] = [r for r in caplog.records if r.name == "lightspeed"]
    assert message in record.getMessage()
    assert record.getMessage().startswith("configuration error: ")


def test_a_missing_config_file_exits_2(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    assert main(["worker", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert f"cannot read config file {tmp_path / 'nope.yaml'}" in caplog.text


def test_a_bad_environment_value_exits_2(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIGHTSPEED_BLOCK_SIZE", "big")
    assert main(["worker"]) == 2
    assert "invalid value 'big' in environment variable LIGHTSPEED_BLOCK_SIZE" in caplog.text


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        ([], {}, True),
        (["--no-kv-events"], {}, False),
        (["--kv-events"], {"LIGHTSPEED_KV_EVENTS": "0"}, True),
        (["--kv-events", "false"], {}, False),  # the older spelling still works
        (["--kv-events=off"], {}, False),
        (["--kv-events", "true"], {}, True),
        ([], {"LIGHTSPEED_KV_EVENTS": "no"}, False),
    ],
)
def test_booleans(argv: list[str], env: dict[str, str], expected: bool) -> None:
    cfg = parse_invocation(["frontend", *argv], environ=env).config
    assert isinstance(cfg, FrontendConfig)
    assert cfg.router.kv_events is expected


@pytest.mark.parametrize(
    "argv", [["--no-kv-events", "false"], ["--kv-events", "maybe"], ["--engine", "gpu"], ["--block-size", "x"]]
)
def test_bad_flag_values_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse_invocation(["serve", *argv], environ={})
    assert exit_.value.code == 2
    assert argv[0] in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse_invocation(["--version"], environ={})
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"lightspeed {importlib.metadata.version('lightspeed')}\n"


@pytest.mark.parametrize(
    ("argv", "env", "level"),
    [
        (["worker"], {}, "INFO"),
        (["worker", "--log-level", "debug"], {}, "DEBUG"),
        (["--log-level", "warning", "frontend"], {}, "WARNING"),
        (["--log-level", "warning", "serve", "--log-level", "error"], {}, "ERROR"),
        (["serve"], {"LIGHTSPEED_LOG_LEVEL": "critical"}, "CRITICAL"),
        (["bench", "--log-level", "ERROR"], {}, "ERROR"),
        (["--log-level", "DEBUG", "bench"], {}, "DEBUG"),
    ],
)
def test_log_level_before_or_after_the_subcommand(argv: list[str], env: dict[str, str], level: str) -> None:
    assert parse_invocation(argv, environ=env).log_level == level


def test_help_documents_each_flag_with_env_and_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_invocation(["frontend", "--help"], environ={})
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--kv-events, --no-kv-events" in out
    assert "(env LIGHTSPEED_ROUTER_MAX_QUEUE; default 1024)" in out
    assert "--config FILE" in out


@pytest.mark.parametrize("which", ["worker", "frontend"])
def test_a_child_rebuilds_exactly_the_config_serve_hands_it(which: str, tmp_path: Path) -> None:
    serve_file = tmp_path / "serve.yaml"
    serve_file.write_text("workers: 3\n")  # valid for serve, unknown to a child: must not be read
    argv = ["serve", "--engine", "mocker", "--block-size", "16", "--no-router-replica-sync", "--model", "m"]
    serve = parse_invocation([*argv, "--router-mode", "kv", "--discovery-path", "/tmp/x"], environ={}).config
    assert isinstance(serve, ServeConfig)
    cfg = serve.worker if which == "worker" else serve.frontend
    spec = child_spec(f"{which}-0", cfg, "DEBUG")
    assert spec.args == [which]
    env = {**spec.env, "LIGHTSPEED_BLOCK_SIZE": "128", CONFIG_FILE_ENV: str(serve_file)}
    inv = parse_invocation(spec.args, environ=env)
    assert inv.config == cfg
    assert inv.log_level == "DEBUG"
    assert spec.env[CHILD_CONFIG_ENV] == encode_config(cfg)


def test_only_startup_value_errors_are_configuration_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    """A ValueError raised while serving is a crash (exit 1 via the traceback, restarted by the
    supervisor), not a configuration error (exit 2, never restarted)."""
    import lightspeed.cli as cli
    from lightspeed.config import ConfigError

    def fail(exc: Exception) -> None:
        def dispatch(_inv: object) -> int:
            raise exc

        monkeypatch.setattr(cli, "_dispatch", dispatch)

    fail(ConfigError("unknown model 'x'"))
    assert cli.main(["worker", "--engine", "mocker"]) == 2
    fail(ValueError("a bug while serving"))
    with pytest.raises(ValueError, match="a bug while serving"):
        cli.main(["worker", "--engine", "mocker"])
