"""Connectors: virtual (decision line, acknowledgement, timeout), kubernetes (the exact PATCH
requests the official client sends, to a recording fake API server on 127.0.0.1), local (the
supervisor's scale_to with real child processes: new children started, retired ones told to
stop after the before-retire hook, never restarted), and the registry."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp import web

from lightspeed.planner.connectors import (
    ConnectorSettings,
    KubernetesConnector,
    LocalConnector,
    VirtualConnector,
    VirtualDecision,
    kubernetes_apps_api,
    make_connector,
)
from lightspeed.planner.core import Decision, Forecast
from lightspeed.runtime.supervisor import ChildSpec, Supervisor
from tests.polling import until

DECISION = Decision(3, "throughput", {"request_rate": 2.0}, Forecast(2.0, 100.0, 10.0), 2, 4, 4)


async def test_virtual_writes_the_decision_and_takes_the_ack(tmp_path: Path) -> None:
    conn = VirtualConnector(tmp_path, ack_timeout=5.0)
    assert await conn.current() is None

    async def actor() -> None:
        await until(lambda: conn.decisions.exists())
        line = msgspec.json.decode(conn.decisions.read_bytes().splitlines()[0], type=VirtualDecision)
        assert (line.seq, line.replicas, line.decision) == (1, 4, DECISION)
        (tmp_path / "ack.json").write_text(json.dumps({"seq": line.seq, "replicas": line.replicas}))

    task = asyncio.create_task(actor())
    result = await conn.scale(4, DECISION)
    await task
    assert (result.replicas, result.acted, result.detail) == (4, True, "ack 1")
    assert await conn.current() == 4


async def test_virtual_without_ack_times_out_and_keeps_its_count(tmp_path: Path) -> None:
    conn = VirtualConnector(tmp_path, ack_timeout=0.2)
    (tmp_path / "ack.json").write_text(json.dumps({"seq": 7, "replicas": 9}))  # an old ack: not ours
    result = await conn.scale(4, DECISION)
    assert (result.acted, result.detail) == (False, "no ack")
    assert await conn.current() is None
    assert len(conn.decisions.read_bytes().splitlines()) == 1


async def test_virtual_ack_of_a_different_count_is_not_acted(tmp_path: Path) -> None:
    conn = VirtualConnector(tmp_path, ack_timeout=2.0)
    (tmp_path / "ack.json").write_text(json.dumps({"seq": 1, "replicas": 3}))  # the actor capped it
    result = await conn.scale(4, DECISION)
    assert (result.replicas, result.acted) == (3, False)
    assert await conn.current() == 3


# ------------------------------------------------------------------ kubernetes


class FakeApiServer:
    """Records every request; answers GET / PATCH of apps/v1 Deployments from a dict."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, str, Any]] = []
        self.replicas: dict[str, int] = {"lightspeed-worker": 2, "prefill": 1, "decode": 1}

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/apis/apps/v1/namespaces/{ns}/deployments/{name}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        body = await request.json() if request.can_read_body else None
        self.requests.append((request.method, request.path, request.content_type, body))
        if name not in self.replicas:
            return web.json_response({"kind": "Status", "code": 404, "reason": "NotFound"}, status=404)
        if request.method == "PATCH":
            self.replicas[name] = body["spec"]["replicas"]
        return web.json_response(_deployment(name, request.match_info["ns"], self.replicas[name]))


def _deployment(name: str, ns: str, replicas: int) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": []}},
        },
    }


@pytest.fixture
async def api_server() -> Any:
    fake = FakeApiServer()
    runner = web.AppRunner(fake.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield fake, f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_kubernetes_patches_spec_replicas(api_server: Any) -> None:
    fake, url = api_server
    settings = ConnectorSettings(k8s_namespace="llm", k8s_deployments=("lightspeed-worker",))
    conn = KubernetesConnector(kubernetes_apps_api(url), settings)
    assert await conn.current() == 2
    result = await conn.scale(5, DECISION)
    await conn.close()
    assert (result.replicas, result.acted, result.detail) == (5, True, "lightspeed-worker=5")
    path = "/apis/apps/v1/namespaces/llm/deployments/lightspeed-worker"
    assert fake.requests == [
        ("GET", path, "application/octet-stream", None),
        ("PATCH", path, "application/strategic-merge-patch+json", {"spec": {"replicas": 5}}),
    ]


async def test_kubernetes_patches_each_pool_of_a_disaggregated_fleet(api_server: Any) -> None:
    fake, url = api_server
    settings = ConnectorSettings(k8s_namespace="llm", k8s_prefill_deployment="prefill", k8s_decode_deployment="decode")
    conn = KubernetesConnector(kubernetes_apps_api(url), settings)
    result = await conn.scale(4, DECISION)  # prefill 2, decode 4
    await conn.close()
    assert result.acted
    patches = [(r[1].rsplit("/", 1)[1], r[3]) for r in fake.requests if r[0] == "PATCH"]
    assert patches == [("prefill", {"spec": {"replicas": 2}}), ("decode", {"spec": {"replicas": 4}})]


async def test_kubernetes_failure_is_a_result_not_an_exception(api_server: Any) -> None:
    _, url = api_server
    conn = KubernetesConnector(kubernetes_apps_api(url), ConnectorSettings(k8s_deployments=("missing",)))
    result = await conn.scale(3, DECISION)
    assert not result.acted and result.detail.startswith("patch missing failed")
    assert await conn.current() is None
    await conn.close()


# ------------------------------------------------------------------ local


def sleeper(log: Path) -> ChildSpec:
    """A child that notes its start, and on SIGTERM notes 'drained' and exits 0."""
    code = (
        "import os, signal, sys, time\n"
        f"log = {str(log)!r}\n"
        "open(log, 'a').write(f'start {os.getpid()}\\n')\n"
        "def bye(*_):\n    open(log, 'a').write(f'drained {os.getpid()}\\n'); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, bye)\n"
        "while True: time.sleep(0.05)\n"
    )
    return ChildSpec("w", [], python_args=("-c", code))


class SupervisorScaler:
    def __init__(self, sup: Supervisor, log: Path) -> None:
        self.sup, self.log = sup, log
        self.hooked: list[int] = []

    def worker_count(self) -> int:
        return self.sup.group_size("worker")

    async def scale_to(self, n: int) -> int:
        return await self.sup.scale_to("worker", n, self._spec, self._before)

    def _spec(self, index: int) -> ChildSpec:
        spec = sleeper(self.log)
        spec.name = f"worker-{index}"
        return spec

    async def _before(self, pid: int) -> None:
        assert f"drained {pid}" not in self.log.read_text()  # the hook runs before the stop
        self.hooked.append(pid)


def lines(log: Path, word: str) -> list[str]:
    return [ln for ln in log.read_text().splitlines() if ln.startswith(word)] if log.exists() else []


async def test_local_connector_grows_and_drains_the_newest(tmp_path: Path) -> None:
    log = tmp_path / "log"
    sup = Supervisor(backoff_seconds=0.01, grace_seconds=5.0)
    scaler = SupervisorScaler(sup, log)
    conn = LocalConnector(scaler)
    try:
        assert (await conn.scale(3, DECISION)).detail == "0 -> 3 workers"
        await until(lambda: len(lines(log, "start")) == 3)
        first = sup.pids
        result = await conn.scale(1, DECISION)
        assert (result.replicas, result.acted, await conn.current()) == (1, True, 1)
        await until(lambda: len(lines(log, "drained")) == 2)
        assert sorted(scaler.hooked) == sorted(first[1:])  # the two newest, hooked then stopped
        await asyncio.sleep(0.3)
        assert len(lines(log, "start")) == 3 and sup.pids == first[:1]  # no restart of the retired
        assert (await conn.scale(1, DECISION)).detail == "unchanged"
        await conn.scale(2, DECISION)
        await until(lambda: len(lines(log, "start")) == 4)
        assert sup.group_size("worker") == 2
    finally:
        await sup.stop()


async def test_registry_builds_by_name_and_refuses_unknown(tmp_path: Path) -> None:
    assert make_connector("virtual", ConnectorSettings(virtual_dir=str(tmp_path))).name == "virtual"
    with pytest.raises(ValueError, match="connector must be one of local, virtual, kubernetes"):
        make_connector("ssh", ConnectorSettings())
    with pytest.raises(ValueError, match="serve --planner"):
        make_connector("local", ConnectorSettings())
    with pytest.raises(ValueError, match="ack_timeout"):
        ConnectorSettings(ack_timeout=0)
