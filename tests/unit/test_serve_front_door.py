"""serve talks to its own frontend (readiness, the in-process planner) through the front door."""

from __future__ import annotations

from pathlib import Path

from lightspeed.config import AuthConfig, FrontendConfig, PlaneConfig, ServeConfig, WorkerConfig
from lightspeed.serve import _with_cluster_secret, frontend_url, readiness_headers


def test_readiness_presents_a_configured_key(tmp_path: Path) -> None:
    assert readiness_headers(AuthConfig()) == {}
    assert readiness_headers(AuthConfig(api_key="sk-the-only-key")) == {"Authorization": "Bearer sk-the-only-key"}
    keys = tmp_path / "keys"
    keys.write_text("# team\nsk-first-key-1 name=a\nsk-second-key-2 name=b\n")
    assert readiness_headers(AuthConfig(api_keys_file=str(keys))) == {"Authorization": "Bearer sk-first-key-1"}


def test_frontend_url_follows_tls() -> None:
    assert frontend_url(ServeConfig()) == "http://127.0.0.1:8000"
    tls = FrontendConfig(auth=AuthConfig(tls_cert="c.pem", tls_key="k.pem"), port=9443)
    assert frontend_url(ServeConfig(frontend=tls)) == "https://127.0.0.1:9443"


def test_serve_closes_its_planes_with_a_fresh_secret_unless_given() -> None:
    a, b = _with_cluster_secret(ServeConfig()), _with_cluster_secret(ServeConfig())
    assert len(a.worker.planes.cluster_secret) == 64
    assert a.worker.planes == a.frontend.planes  # one secret for the whole fleet
    assert a.worker.planes.cluster_secret != b.worker.planes.cluster_secret  # per run
    planes = PlaneConfig(cluster_secret="given-secret-of-the-user")
    given = ServeConfig(FrontendConfig(planes=planes), WorkerConfig(planes=planes))
    assert _with_cluster_secret(given).worker.planes.cluster_secret == "given-secret-of-the-user"
