from __future__ import annotations

import pytest

from lightspeed.cli import build_parser, worker_config
from lightspeed.config import FrontendConfig, PlaneConfig, ServeConfig, WorkerConfig


@pytest.mark.parametrize("kw", [{"port": 70000}, {"router_mode": "magic"}, {"processes": 0}, {"migration_limit": -1}])
def test_frontend_config_rejects(kw: dict) -> None:
    with pytest.raises(ValueError):
        FrontendConfig(**kw)


@pytest.mark.parametrize(
    "kw",
    [
        {"engine": "gpu"},
        {"role": "boss"},
        {"block_size": 0},
        {"speedup_ratio": 0},
        {"num_gpu_blocks": -1},
        {"max_num_seqs": 0},
    ],
)
def test_worker_config_rejects(kw: dict) -> None:
    with pytest.raises(ValueError):
        WorkerConfig(**kw)


def test_plane_config_rejects_unknown_discovery() -> None:
    with pytest.raises(ValueError, match="discovery"):
        PlaneConfig(discovery="zookeeper")


def test_serve_config_requires_shared_planes() -> None:
    with pytest.raises(ValueError):
        ServeConfig(FrontendConfig(planes=PlaneConfig(discovery="mem")), WorkerConfig(), 1)


def test_flags_read_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIGHTSPEED_BLOCK_SIZE", "16")
    monkeypatch.setenv("LIGHTSPEED_ENGINE", "mocker")
    args = build_parser().parse_args(["worker"])
    cfg = worker_config(args)
    assert (cfg.block_size, cfg.engine) == (16, "mocker")
    args = build_parser().parse_args(["worker", "--block-size", "32"])
    assert worker_config(args).block_size == 32  # the flag beats the environment
