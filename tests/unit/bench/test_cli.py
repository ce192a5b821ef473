import argparse

import pytest

from lightspeed.bench.cli import add_bench_args, config_from_args


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_bench_args(parser)
    return parser.parse_args(argv)


def test_flags_bind_to_config() -> None:
    cfg = config_from_args(
        _parse(
            [
                "--url",
                "http://h:1",
                "--concurrency",
                "8",
                "--isl",
                "32",
                "--osl",
                "4",
                "--no-keepalive",
                "--out",
                "/tmp/x",
            ]
        )
    )
    assert (cfg.url, cfg.concurrency, cfg.isl, cfg.osl) == ("http://h:1", 8, 32, 4)
    assert (cfg.num_requests, cfg.keepalive, cfg.out_dir) == (1000, False, "/tmp/x")
    assert cfg.resolved_mode == "closed"


def test_env_vars_are_defaults_and_flags_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIGHTSPEED_URL", "http://env:9")
    monkeypatch.setenv("LIGHTSPEED_CONCURRENCY", "5")
    monkeypatch.setenv("LIGHTSPEED_PROGRESS", "false")
    monkeypatch.setenv("LIGHTSPEED_TRACE", "t.jsonl")
    cfg = config_from_args(_parse(["--concurrency", "6", "--speedup", "10"]))
    assert (cfg.url, cfg.concurrency, cfg.progress, cfg.trace) == (
        "http://env:9",
        6,
        False,
        "t.jsonl",
    )
    assert cfg.num_requests is None  # a trace replays all of itself by default
    assert cfg.resolved_mode == "open" and cfg.speedup == 10.0


def test_invalid_values_raise() -> None:
    with pytest.raises(ValueError):
        config_from_args(_parse(["--url", "ftp://x"]))
    with pytest.raises(ValueError):
        config_from_args(_parse(["--mode", "open"]))  # no trace, no request rate
    with pytest.raises(SystemExit):
        _parse(["--concurrency", "many"])
