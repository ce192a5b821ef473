"""`lightspeed serve` configuration end to end, with real processes: a YAML config file reaches
the workers through the JSON hand-off, and a child's configuration error stops serve at once
with exit 2 instead of a restart loop."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.integration.conftest import free_port, start_serve, stop_serve


def test_serve_with_an_unknown_model_exits_2_without_restarting() -> None:
    cmd = [sys.executable, "-m", "lightspeed", "serve", "--engine", "native", "--model", "/nonexistent"]
    t0 = time.monotonic()
    proc = subprocess.run(
        [*cmd, "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    elapsed = time.monotonic() - t0
    assert proc.returncode == 2, proc.stderr
    # The worker's own message, once: it was started a single time.
    assert proc.stderr.count("configuration error: unknown model '/nonexistent'") == 1
    assert "worker-0 exited with a configuration error (exit 2); not restarting" in proc.stderr
    assert "started worker-0" in proc.stderr and proc.stderr.count("started worker-0") == 1
    # A restart loop takes >= 12 s of backoff alone; this is start-up plus shutdown.
    assert elapsed < 10, f"serve took {elapsed:.1f}s to give up"


def test_serve_reads_a_config_file_and_hands_it_to_the_workers(tmp_path: Path) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text("engine: mocker\nspeedup-ratio: 50\nserved_model_name: from-yaml\nnum-gpu-blocks: 256\n")
    server = start_serve(["--config", str(config)], workers=2)
    try:
        with urllib.request.urlopen(server.base_url + "/models", timeout=5) as r:
            models = json.loads(r.read())
        assert [m["id"] for m in models["data"]] == ["from-yaml"]
        workers = server.health()["workers"]
        # the default engine is native: "mocker" came from the file
        assert sorted(w["instance_id"].split("-")[0] for w in workers) == ["mocker", "mocker"]
        assert [w["model"] for w in workers] == ["from-yaml", "from-yaml"]
    finally:
        assert stop_serve(server) == 0
