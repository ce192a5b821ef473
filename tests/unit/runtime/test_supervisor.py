"""Supervisor: restart with backoff, give up after a crash loop, never restart a configuration
error (exit 2), SIGTERM then SIGKILL on stop.

The children are real Python processes (`python -c ...`); each one appends a line to a file when
it starts, so the tests count starts exactly.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest

from lightspeed.runtime.supervisor import ChildSpec, Supervisor
from tests.polling import until


def script_child(name: str, log: Path, body: str, restart: bool = True) -> ChildSpec:
    code = f"open({str(log)!r}, 'a').write('start\\n')\n{body}"
    return ChildSpec(name, [], restart=restart, python_args=("-c", code))


def starts(log: Path) -> int:
    return log.read_text().count("start") if log.exists() else 0


async def test_a_child_that_must_not_restart_fails_the_supervisor(tmp_path: Path) -> None:
    log = tmp_path / "starts"
    sup = Supervisor(backoff_seconds=0.01)
    await sup.spawn(script_child("once", log, "raise SystemExit(3)", restart=False))
    await asyncio.wait_for(sup.failed.wait(), 10)
    assert starts(log) == 1
    assert sup.pids == []
    await sup.stop()


async def test_a_crash_loop_is_restarted_max_restarts_times_then_given_up(tmp_path: Path) -> None:
    log = tmp_path / "starts"
    sup = Supervisor(max_restarts=3, backoff_seconds=0.01)
    await sup.spawn(script_child("crashy", log, "raise SystemExit(1)"))
    await asyncio.wait_for(sup.failed.wait(), 20)
    assert starts(log) == 1 + 3
    assert sup.failed_code == 1
    await sup.stop()


async def test_a_configuration_error_is_not_restarted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    log = tmp_path / "starts"
    sup = Supervisor(max_restarts=5, backoff_seconds=0.01)
    with caplog.at_level(logging.INFO, logger="lightspeed.runtime.supervisor"):
        await sup.spawn(script_child("worker-0", log, "raise SystemExit(2)"))
        await asyncio.wait_for(sup.failed.wait(), 10)
    assert starts(log) == 1
    assert sup.failed_code == 2
    assert sup.pids == []
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == ["worker-0 exited with a configuration error (exit 2); not restarting"]
    await sup.stop()


async def test_a_healthy_child_is_stopped_with_sigterm(tmp_path: Path) -> None:
    log = tmp_path / "starts"
    sup = Supervisor(grace_seconds=10)
    await sup.spawn(script_child("healthy", log, "import time; time.sleep(60)"))
    await until(lambda: starts(log) == 1, timeout=10, interval=0.02)
    assert len(sup.pids) == 1
    t0 = time.monotonic()
    await sup.stop()
    assert time.monotonic() - t0 < 5  # SIGTERM's default action ends it at once
    assert sup.pids == [] and starts(log) == 1 and not sup.failed.is_set()


async def test_a_child_that_ignores_sigterm_is_killed_after_the_grace_period(tmp_path: Path) -> None:
    log = tmp_path / "starts"
    # It writes "ignoring" once its handler is in place: SIGTERM before that would just end it.
    stubborn = (
        "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        f"open({str(log)!r}, 'a').write('ignoring\\n')\ntime.sleep(60)"
    )
    sup = Supervisor(grace_seconds=0.5)
    await sup.spawn(script_child("stubborn", log, stubborn))
    await until(lambda: starts(log) == 1 and "ignoring" in log.read_text(), timeout=10, interval=0.02)
    t0 = time.monotonic()
    await sup.stop()
    assert 0.5 <= time.monotonic() - t0 < 5
    assert sup.pids == [] and starts(log) == 1


@pytest.mark.parametrize(
    ("kwargs"),
    [{"grace_seconds": 0}, {"max_restarts": -1}, {"backoff_seconds": -0.1}, {"stable_seconds": 0}],
)
def test_bad_settings_are_rejected(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="supervisor"):
        Supervisor(**kwargs)  # type: ignore[arg-type]
