"""The Kubernetes deployment files (deploy/): every overlay builds with kustomize, validates
against the Kubernetes schemas, goes through `kubectl apply --dry-run=client`, and every
Lightspeed container's command line is one our CLI accepts, with probes where the flags put them."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from lightspeed.cli import parse_invocation

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
OVERLAYS = sorted(p.name for p in (DEPLOY / "overlays").iterdir() if p.is_dir())
K8S_VERSION = "1.31.0"  # schemas shipped by the pinned kubernetes-validate
IMAGE = "ghcr.io/lightspeed-ai/lightspeed:0.1.0"
KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed (it builds the overlays)")


def build(overlay: str) -> list[dict[str, Any]]:
    assert KUBECTL is not None
    out = subprocess.run([KUBECTL, "kustomize", str(DEPLOY / "overlays" / overlay)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def containers(docs: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet"):
            for c in d["spec"]["template"]["spec"]["containers"]:
                yield d, c


def test_there_are_the_documented_overlays() -> None:
    assert OVERLAYS == ["1p1d", "autoscaled", "embedded-small", "multi-model"]


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates_against_the_kubernetes_schemas(overlay: str) -> None:
    docs = build(overlay)
    assert len(docs) >= 10
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)  # raises on any violation


def _environment(docs: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """What the container's environment holds at run time: its ConfigMaps, plain values and
    placeholders of the right shape for the fields Kubernetes fills in."""
    maps = by_kind(docs, "ConfigMap")
    env: dict[str, str] = {}
    for src in container.get("envFrom", []):
        env |= maps[src["configMapRef"]["name"]]["data"]
    for var in container.get("env", []):
        env[var["name"]] = var.get("value", "placeholder-of-sixteen+-chars")
    env["POD_IP"], env["POD_NAMESPACE"] = "10.1.2.3", "lightspeed"
    return env


def _expand(arg: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\(([A-Z_]+)\)", lambda m: env[m.group(1)], arg)


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_lightspeed_command_line_parses_with_our_cli(overlay: str) -> None:
    docs = build(overlay)
    seen = set()
    for _, c in containers(docs):
        assert c["image"] != "lightspeed", "an image name the images transformer did not resolve"
        if c["image"] != IMAGE:
            continue
        assert c["command"] == ["lightspeed"]
        env = {k: v for k, v in _environment(docs, c).items() if k.startswith("LIGHTSPEED_")}
        full_env = _environment(docs, c)
        args = [_expand(a, full_env) for a in c["args"]]
        inv = parse_invocation(args, environ=env)  # an unknown flag or bad value raises / exits
        seen.add(inv.command)
        if inv.config is not None:
            planes = inv.config.planes
            assert (planes.discovery, planes.event_plane) == ("etcd", "nats")
            assert planes.cluster_secret  # from the lightspeed-cluster Secret
    assert {"frontend", "worker"} <= seen


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_point_where_the_flags_listen(overlay: str) -> None:
    docs = build(overlay)
    for dep, c in containers(docs):
        if c["image"] != IMAGE or c["args"][0] == "planner":
            continue
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        inv = parse_invocation([_expand(a, _environment(docs, c)) for a in c["args"]], environ={})
        cfg = inv.config
        assert cfg is not None
        probe_port = getattr(cfg, "health_port", None) or getattr(cfg, "port", None)
        assert c["readinessProbe"]["httpGet"]["path"] == "/health"
        assert c["livenessProbe"]["httpGet"]["path"] == "/live"
        assert ports[c["readinessProbe"]["httpGet"]["port"]] == probe_port
        assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
        if inv.command == "frontend":
            assert cfg.auth.public_health  # the readiness probe carries no API key
        else:
            affinity = dep["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
            assert affinity["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
            assert dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > cfg.drain_timeout


@needs_kubectl
def test_roles_of_the_1p1d_pools_and_no_aggregated_workers() -> None:
    deployments = by_kind(build("1p1d"), "Deployment")
    roles = {}
    for name, dep in deployments.items():
        args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
        if args[0] == "worker":
            roles[name] = next(a.split("=", 1)[1] for a in args if a.startswith("--role="))
    assert roles == {"lightspeed-worker-prefill": "prefill", "lightspeed-worker-decode": "decode"}


@needs_kubectl
def test_the_planner_scales_a_deployment_that_exists_and_may_do_only_that() -> None:
    docs = build("autoscaled")
    planner = by_kind(docs, "Deployment")["lightspeed-planner"]
    args = planner["spec"]["template"]["spec"]["containers"][0]["args"]
    target = next(a.split("=", 1)[1] for a in args if a.startswith("--k8s-deployment="))
    assert target in by_kind(docs, "Deployment")
    assert "--connector=kubernetes" in args
    role = by_kind(docs, "Role")["lightspeed-planner"]
    verbs = {(r["apiGroups"][0], res, v) for r in role["rules"] for res in r["resources"] for v in r["verbs"]}
    assert ("apps", "deployments", "patch") in verbs
    assert all(group == "apps" for group, _, _ in verbs)
    binding = by_kind(docs, "RoleBinding")["lightspeed-planner"]
    assert binding["subjects"][0]["name"] == planner["spec"]["template"]["spec"]["serviceAccountName"]


# ---------------------------------------------------------------- kubectl apply --dry-run=client

_GROUPS = {
    "v1": ["namespaces:Namespace:0", "services:Service", "configmaps:ConfigMap", "secrets:Secret"]
    + ["serviceaccounts:ServiceAccount", "persistentvolumeclaims:PersistentVolumeClaim"],
    "apps/v1": ["deployments:Deployment", "statefulsets:StatefulSet"],
    "rbac.authorization.k8s.io/v1": ["roles:Role", "rolebindings:RoleBinding"],
    "policy/v1": ["poddisruptionbudgets:PodDisruptionBudget"],
}


def _discovery() -> dict[str, Any]:
    """An API server's discovery documents for the kinds the manifests use (nothing else)."""
    docs: dict[str, Any] = {"/api": {"kind": "APIVersions", "versions": ["v1"]}}
    groups = []
    for gv, resources in _GROUPS.items():
        path = "/api/v1" if gv == "v1" else f"/apis/{gv}"
        items = []
        for spec in resources:
            name, kind, *flag = spec.split(":")
            verbs = ["create", "get", "list", "patch", "update", "delete"]
            items.append({"name": name, "kind": kind, "namespaced": not flag, "singularName": "", "verbs": verbs})
        docs[path] = {"kind": "APIResourceList", "groupVersion": gv, "resources": items}
        if gv != "v1":
            group, version = gv.split("/")
            ver = {"groupVersion": gv, "version": version}
            groups.append({"name": group, "versions": [ver], "preferredVersion": ver})
    docs["/apis"] = {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}
    return docs


class _FakeApiServer(BaseHTTPRequestHandler):
    """Answers discovery; every object is absent (404), as in an empty cluster."""

    discovery = _discovery()

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        body = self.discovery.get(path)
        status = 200 if body is not None else 404
        if body is None:
            body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def api_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeApiServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubectl_apply_dry_run_client(overlay: str, api_server: str, tmp_path: Path) -> None:
    assert KUBECTL is not None
    docs = build(overlay)
    manifest = tmp_path / "all.yaml"
    manifest.write_text(yaml.safe_dump_all(docs))
    cmd = [KUBECTL, "apply", "--dry-run=client", "--validate=false", "--server", api_server, "-f", str(manifest)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env={"HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    created = [line for line in out.stdout.splitlines() if line.endswith("created (dry run)")]
    assert len(created) == len(docs)
