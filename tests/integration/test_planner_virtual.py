"""The standalone `lightspeed planner` against a live mocker fleet, acting through the virtual
connector: it scrapes the frontend's /metrics, follows the workers' forward-pass metrics over
the event plane (through the fleet's discovery folder), writes each decision for an actor (this
test) to acknowledge, logs it as a JSON line and serves its own /metrics. A refused option
exits 2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.integration.conftest import CLUSTER_SECRET, MOCKER_ARGS, MODEL, free_port, start_serve, stop_serve


def ack_all(virtual: Path) -> int:
    """Acknowledge the newest decision as asked; returns how many decisions were written."""
    path = virtual / "decisions.jsonl"
    if not path.exists():
        return 0
    lines = path.read_text().splitlines()
    if lines:
        last = json.loads(lines[-1])
        (virtual / "ack.json").write_text(json.dumps({"seq": last["seq"], "replicas": last["replicas"]}))
    return len(lines)


def send(url: str, n: int) -> None:
    for i in range(n):
        body = {"model": MODEL, "prompt": list(range(100 + i, 164 + i)), "max_tokens": 16, "ignore_eos": True}
        req = urllib.request.Request(
            url + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert resp.status == 200


def test_standalone_planner_observes_the_fleet_and_acts_through_the_virtual_connector(tmp_path: Path) -> None:
    discovery, virtual, log = tmp_path / "discovery", tmp_path / "virtual", tmp_path / "decisions.jsonl"
    server = start_serve([*MOCKER_ARGS, "--speedup-ratio", "10", "--discovery-path", str(discovery)], workers=2)
    metrics_port = free_port()
    cmd = [sys.executable, "-m", "lightspeed", "planner", "--frontend-url", server.url, "--connector", "virtual"]
    cmd += ["--virtual-dir", str(virtual), "--ack-timeout", "3", "--adjustment-interval", "1"]
    cmd += ["--decision-log", str(log), "--metrics-port", str(metrics_port), "--max-workers", "4"]
    cmd += ["--discovery-path", str(discovery), "--cluster-secret", CLUSTER_SECRET]
    planner = subprocess.Popen(cmd, start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    done = threading.Event()

    def actor() -> None:  # acknowledges every decision while the test runs
        while not done.is_set():
            ack_all(virtual)
            time.sleep(0.05)

    acks = threading.Thread(target=actor)
    acks.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and ack_all(virtual) < 2:
            assert planner.poll() is None, "the planner exited"
            time.sleep(0.1)
        send(server.url, 30)  # load between two decisions
        seen = ack_all(virtual)
        while time.monotonic() < deadline and ack_all(virtual) < seen + 2:
            time.sleep(0.1)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    finally:
        done.set()
        acks.join()
        planner.send_signal(signal.SIGTERM)
        code = planner.wait(timeout=30)
        stop_serve(server)
    assert code == 0
    records = [json.loads(line) for line in log.read_text().splitlines()]
    busy = [r for r in records if (r["decision"]["observed"]["request_rate"] or 0) > 0]
    assert busy, records
    assert any(r["extra"]["steps"] > 0 and r["extra"]["stepping_workers"] >= 1 for r in busy), busy
    assert all(r["result"]["acted"] for r in records), records  # the actor acked each one
    assert "lightspeed_planner_decisions_total" in text and 'lightspeed_planner_observed{field="isl"}' in text


def test_the_local_connector_is_refused_outside_serve() -> None:
    cmd = [sys.executable, "-m", "lightspeed", "planner", "--connector", "local"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "serve --planner" in done.stderr


@pytest.mark.parametrize("flag", [["--ttft-slo", "0"], ["--min-workers", "3", "--max-workers", "2"]])
def test_bad_planner_options_exit_2(flag: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "lightspeed", "planner", *flag], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done.stderr
