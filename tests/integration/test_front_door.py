"""The authenticated front door, end to end: `lightspeed serve` over HTTPS with an API keys file,
driven by the real `openai` client (and urllib for the plain endpoints)."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

from tests.integration.conftest import free_port

DATA = Path(__file__).parent / "data"
CERT, KEY = DATA / "tls_test.crt", DATA / "tls_test.key"  # self-signed for 127.0.0.1, valid 100 years
KEYS_FILE = "sk-alice-000001 name=alice rpm=4\nsk-bob-00000002 name=bob tpm=300\nsk-carol-00003 name=carol\n"


@dataclass
class TlsServer:
    url: str
    proc: subprocess.Popen[bytes]
    ctx: ssl.SSLContext

    def get(self, path: str, key: str | None = None) -> tuple[int, bytes]:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        req = urllib.request.Request(self.url + path, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=5, context=self.ctx) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def client(self, key: str) -> openai.OpenAI:
        http = openai.DefaultHttpxClient(verify=self.ctx)
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, http_client=http)


def _wait_ready(server: TlsServer, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.proc.poll() is None, f"serve exited with {server.proc.returncode}"
        try:
            status, body = server.get("/health")
            if status == 200 and json.loads(body)["workers"]:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError("serve did not become ready")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(KEYS_FILE)
    port = free_port()
    args = ["--engine", "mocker", "--speedup-ratio", "50", "--workers", "1", "--port", str(port)]
    args += ["--api-keys-file", str(keys), "--tls-cert", str(CERT), "--tls-key", str(KEY), "--public-health"]
    proc = subprocess.Popen([sys.executable, "-m", "lightspeed", "serve", *args], start_new_session=True)
    ctx = ssl.create_default_context(cafile=str(CERT))
    srv = TlsServer(f"https://127.0.0.1:{port}", proc, ctx)
    try:
        _wait_ready(srv)
        yield srv
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0


def test_a_known_key_is_served_over_tls(server: TlsServer) -> None:
    out = server.client("sk-carol-00003").completions.create(model=_model(server), prompt="hello", max_tokens=5)
    assert out.usage is not None and out.usage.completion_tokens == 5


def test_missing_or_wrong_key_is_401_with_openai_error(server: TlsServer) -> None:
    with pytest.raises(openai.AuthenticationError) as err:
        server.client("sk-not-a-real-key").completions.create(model=_model(server), prompt="hi", max_tokens=1)
    assert err.value.status_code == 401
    assert err.value.code == "invalid_api_key"
    status, body = server.get("/v1/models")
    assert status == 401
    assert json.loads(body)["error"]["code"] == "missing_api_key"


def test_public_and_private_plain_endpoints(server: TlsServer) -> None:
    assert server.get("/health")[0] == 200  # --public-health
    assert server.get("/live")[0] == 200  # always public
    assert server.get("/metrics")[0] == 401  # not configured public
    status, body = server.get("/metrics", key="sk-carol-00003")
    assert status == 200 and b"lightspeed_" in body


def test_request_rate_limit_answers_429_with_retry_after(server: TlsServer) -> None:
    client = server.client("sk-alice-000001")  # rpm=4: four, then one every 15 s
    for _ in range(4):
        client.completions.create(model=_model(server), prompt="x", max_tokens=1)
    with pytest.raises(openai.RateLimitError) as err:
        client.completions.create(model=_model(server), prompt="x", max_tokens=1)
    assert err.value.response.headers["retry-after"] in {"15", "14"}
    assert err.value.code == "rate_limit_requests"
    # another key is not affected
    server.client("sk-carol-00003").completions.create(model=_model(server), prompt="x", max_tokens=1)


def test_token_rate_limit_charges_real_usage(server: TlsServer) -> None:
    client = server.client("sk-bob-00000002")  # tpm=300
    out = client.completions.create(model=_model(server), prompt="count", max_tokens=320)
    assert out.usage is not None and out.usage.total_tokens > 300
    with pytest.raises(openai.RateLimitError) as err:
        client.completions.create(model=_model(server), prompt="x", max_tokens=1)
    assert err.value.code == "rate_limit_tokens"
    assert int(err.value.response.headers["retry-after"]) >= 1


def test_plain_http_on_the_tls_port_gets_no_api(server: TlsServer) -> None:
    plain = server.url.replace("https://", "http://")
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(plain + "/live", timeout=5).read()


def test_bad_front_door_config_exits_2_naming_the_problem(tmp_path: Path) -> None:
    cases = [
        (["--rate-limit-rpm", "5"], "rate limits are per API key"),
        (["--tls-cert", str(CERT)], "--tls-cert and --tls-key go together"),
        (["--api-key", "short"], "an API key must be >= 8"),
        (["--api-keys-file", str(tmp_path / "none")], "cannot read API keys file"),
        (["--api-key", "sk-long-enough", "--tls-cert", str(KEY), "--tls-key", str(KEY)], "cannot load TLS certificate"),
    ]
    for args, message in cases:
        cmd = [sys.executable, "-m", "lightspeed", "frontend", "--port", "0", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env={**os.environ})
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        assert message in proc.stderr, (args, proc.stderr[-2000:])


def _model(server: TlsServer) -> str:
    status, body = server.get("/v1/models", key="sk-carol-00003")
    assert status == 200
    return str(json.loads(body)["data"][0]["id"])
