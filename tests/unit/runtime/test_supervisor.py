"""Supervisor: restart with backoff, give up after a crash loop, never restart a configuration
error (exit 2), SIGTERM then SIGKILL on stop, SIGKILL and restart a child whose event loop stopped
heartbeating, tell `on_exit` the pid of every child that exited.

The children are real Python processes (`python -c ...`); each one appends a line to a file when
it starts, so the tests count starts exactly. The liveness children heartbeat with the real
child-side code (`heartbeat.with_heartbeat`), as `lightspeed frontend|worker` do.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from lightspeed.runtime.heartbeat import HEARTBEAT_FD_ENV, with_heartbeat
from lightspeed.runtime.supervisor import ChildSpec, Supervisor
from tests.polling import until


def script_child(
    name: str, log: Path, body: str, restart: bool = True, on_exit: Callable[[int], object] | None = None
) -> ChildSpec:
    code = f"open({str(log)!r}, 'a').write('start\\n')\n{body}"
    return ChildSpec(name, [], restart=restart, python_args=("-c", code), on_exit=on_exit)


def starts(log: Path) -> int:
    return log.read_text().count("start") if log.exists() else 0


def heartbeating(log: Path, body: str) -> str:
    """A child whose asyncio loop heartbeats while it runs `body` (a coroutine's statements)."""
    main = "".join(f"    {line}\n" for line in body.splitlines())
    return (
        "import asyncio, time\nfrom lightspeed.runtime.heartbeat import with_heartbeat\n"
        f"def note(what):\n    open({str(log)!r}, 'a').write(what + '\\n')\n"
        f"async def main():\n{main}asyncio.run(with_heartbeat(main()))"
    )


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
    [
        {"grace_seconds": 0},
        {"max_restarts": -1},
        {"backoff_seconds": -0.1},
        {"stable_seconds": 0},
        {"liveness_seconds": -1},
    ],
)
def test_bad_settings_are_rejected(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="supervisor"):
        Supervisor(**kwargs)  # type: ignore[arg-type]


async def test_a_child_whose_loop_is_stuck_is_killed_and_restarted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = tmp_path / "starts"
    # It beats for a while, then blocks its event loop: the process lives on, the beats stop.
    stuck = heartbeating(log, "await asyncio.sleep(0.5)\nnote('stalled')\ntime.sleep(60)")
    exited: list[int] = []
    sup = Supervisor(liveness_seconds=1.0, backoff_seconds=0.01)
    with caplog.at_level(logging.INFO, logger="lightspeed.runtime.supervisor"):
        await sup.spawn(script_child("worker-0", log, stuck, on_exit=exited.append))
        await until(lambda: "stalled" in log.read_text() if log.exists() else False, timeout=20, interval=0.02)
        [first] = sup.pids
        stalled = time.monotonic()
        await until(lambda: starts(log) == 2, timeout=10, interval=0.02, what="the restart")
    # Killed once the last beat (up to 0.2 s before the stall) is 1 s old; restarted at once.
    assert 0.7 <= time.monotonic() - stalled < 1.0 + 3.0
    assert exited[0] == first and not sup.failed.is_set()
    killed = [r.getMessage() for r in caplog.records if "heartbeat" in r.getMessage()]
    assert killed and killed[0].startswith(f"worker-0 (pid {first}) sent no heartbeat for 1.")
    assert f"worker-0 exited with code {-signal.SIGKILL}" in caplog.messages
    await sup.stop()


async def test_a_heartbeating_child_is_never_restarted(tmp_path: Path) -> None:
    log = tmp_path / "starts"
    # Busy but responsive: its loop runs a tick every 0.1 s, for 10 liveness timeouts.
    ticking = heartbeating(
        log, "for _ in range(30):\n    note('tick')\n    await asyncio.sleep(0.1)\nawait asyncio.sleep(60)"
    )
    exited: list[int] = []
    sup = Supervisor(liveness_seconds=0.3, backoff_seconds=0.01)
    await sup.spawn(script_child("healthy", log, ticking, on_exit=exited.append))
    await until(lambda: starts(log) == 1, timeout=20, interval=0.02)
    [pid] = sup.pids
    await until(lambda: log.read_text().count("tick") == 30, timeout=30, interval=0.05, what="30 ticks")
    assert starts(log) == 1 and sup.pids == [pid] and exited == []
    await sup.stop()
    assert exited == [pid]  # stopped: on_exit hears of it too


async def test_without_liveness_a_silent_child_is_left_alone_and_gets_no_pipe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "starts"
    probe = "import os, time\nopen({0!r}, 'a').write(repr(os.environ.get('LIGHTSPEED_HEARTBEAT_FD')))\ntime.sleep(60)"
    # This process's own pipe number (were it a supervised child) is not passed on either.
    monkeypatch.setenv(HEARTBEAT_FD_ENV, "7")
    sup = Supervisor()
    await sup.spawn(script_child("plain", log, probe.format(str(log))))
    await until(lambda: log.exists() and log.read_text().endswith("None"), timeout=10, interval=0.02)
    assert starts(log) == 1
    await sup.stop()


async def test_a_leaked_heartbeat_variable_never_writes_into_another_file(tmp_path: Path) -> None:
    with open(tmp_path / "data", "wb") as f:
        done = await with_heartbeat(asyncio.sleep(0.05, result="done"), {HEARTBEAT_FD_ENV: str(f.fileno())})
        assert done == "done" and os.get_blocking(f.fileno())  # untouched: not even made non-blocking
    assert (tmp_path / "data").read_bytes() == b""


async def test_on_exit_hears_the_pid_of_a_crashed_child_before_its_restart(tmp_path: Path) -> None:
    log = tmp_path / "starts"
    exited: list[int] = []
    sup = Supervisor(backoff_seconds=0.01, max_restarts=1)
    await sup.spawn(script_child("crashy", log, "raise SystemExit(1)", on_exit=exited.append))
    await asyncio.wait_for(sup.failed.wait(), 20)
    assert starts(log) == 2 and len(exited) == 2 and exited[0] != exited[1]
    await sup.stop()
