"""Connectors: how a planner decision becomes workers (DESIGN §7). A small registry by name.

* `local`: the supervisor of a running `lightspeed serve` (in-process: `serve --planner`)
  grows or shrinks its worker group; a retired worker is deregistered first, then drains its
  in-flight streams and exits (runtime/supervisor.py `scale_to`, serve.py `LocalWorkerScaler`).
* `virtual`: appends the decision as a JSON line to a file and waits for an acknowledgement
  file naming that decision's sequence number; an external actor (a test, a simulator, a
  human) applies it. No acknowledgement within the timeout: not acted on.
* `kubernetes`: patches `spec.replicas` of the worker Deployment(s) through the official
  `kubernetes` client (optional dependency `lightspeed[planner]`).

Every connector answers `current()` (the replica count it believes is running) and
`scale(target, decision)` -> `ScaleResult`. A connector never raises on a failed action: the
planner logs the result and tries again next interval.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import msgspec

from lightspeed.planner.core import Decision

log = logging.getLogger(__name__)


class ScaleResult(msgspec.Struct, frozen=True):
    replicas: int  # what the connector believes is running after the call
    acted: bool  # the target was applied (acknowledged, patched, started/retired)
    detail: str = ""


class Connector(Protocol):
    name: str

    async def current(self) -> int | None: ...

    async def scale(self, target: int, decision: Decision) -> ScaleResult: ...

    async def close(self) -> None: ...


class WorkerScaler(Protocol):
    """What the local connector drives: serve's worker group."""

    def worker_count(self) -> int: ...

    async def scale_to(self, n: int) -> int: ...


@dataclass(frozen=True)
class ConnectorSettings:
    """Options of every connector; each reads its own."""

    virtual_dir: str = ""  # virtual: folder of decisions.jsonl and ack.json
    ack_timeout: float = 10.0  # virtual: seconds to wait for the acknowledgement
    k8s_namespace: str = "default"
    k8s_deployments: tuple[str, ...] = ("lightspeed-worker",)  # aggregated workers
    k8s_prefill_deployment: str = ""  # disaggregated pools: patched with decision.prefill / .decode
    k8s_decode_deployment: str = ""

    def __post_init__(self) -> None:
        if not self.ack_timeout > 0:
            raise ValueError(f"ack_timeout must be > 0; got {self.ack_timeout}")
        if not self.k8s_namespace:
            raise ValueError("k8s_namespace must not be empty")


# ------------------------------------------------------------------ local


class LocalConnector:
    name = "local"

    def __init__(self, scaler: WorkerScaler) -> None:
        self._scaler = scaler

    async def current(self) -> int | None:
        return self._scaler.worker_count()

    async def scale(self, target: int, decision: Decision) -> ScaleResult:
        before = self._scaler.worker_count()
        if target == before:
            return ScaleResult(before, True, "unchanged")
        after = await self._scaler.scale_to(target)
        return ScaleResult(after, after == target, f"{before} -> {after} workers")

    async def close(self) -> None:
        return None


# ------------------------------------------------------------------ virtual


class VirtualDecision(msgspec.Struct, frozen=True):
    seq: int
    replicas: int
    decision: Decision


class VirtualAck(msgspec.Struct, frozen=True):
    seq: int
    replicas: int  # what the actor applied (may differ from the request)


class VirtualConnector:
    """Writes `decisions.jsonl` lines; waits for `ack.json` with the same `seq`."""

    name = "virtual"
    POLL_S = 0.05

    def __init__(self, folder: str | Path, ack_timeout: float, clock: Callable[[], float] = time.monotonic) -> None:
        if not str(folder):
            raise ValueError("virtual connector: give a folder (--virtual-dir)")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.decisions = self.folder / "decisions.jsonl"
        self.ack = self.folder / "ack.json"
        self._timeout = ack_timeout
        self._clock = clock
        self._seq = 0
        self._replicas: int | None = None

    async def current(self) -> int | None:
        return self._replicas

    async def scale(self, target: int, decision: Decision) -> ScaleResult:
        self._seq += 1
        line = msgspec.json.encode(VirtualDecision(self._seq, target, decision)) + b"\n"
        with self.decisions.open("ab") as f:
            f.write(line)
        ack = await self._wait_ack(self._seq)
        if ack is None:
            log.warning("virtual connector: no acknowledgement of decision %d in %.1fs", self._seq, self._timeout)
            return ScaleResult(self._replicas if self._replicas is not None else target, False, "no ack")
        self._replicas = ack.replicas
        return ScaleResult(ack.replicas, ack.replicas == target, f"ack {ack.seq}")

    async def _wait_ack(self, seq: int) -> VirtualAck | None:
        deadline = self._clock() + self._timeout
        while True:
            ack = self._read_ack()
            if ack is not None and ack.seq == seq:
                return ack
            if self._clock() >= deadline:
                return None
            await asyncio.sleep(self.POLL_S)

    def _read_ack(self) -> VirtualAck | None:
        try:
            return msgspec.json.decode(self.ack.read_bytes(), type=VirtualAck)
        except FileNotFoundError:
            return None
        except (OSError, msgspec.DecodeError) as err:  # half-written: read again next poll
            log.debug("virtual connector: unreadable ack: %s", err)
            return None

    async def close(self) -> None:
        return None


# ------------------------------------------------------------------ kubernetes


class KubernetesConnector:
    """Patches `spec.replicas` of Deployments with the apps/v1 API (a merge patch)."""

    name = "kubernetes"

    def __init__(self, apps_api: Any, settings: ConnectorSettings) -> None:
        self._api = apps_api  # kubernetes.client.AppsV1Api (Any: the client ships no types)
        self._s = settings

    def _targets(self, target: int, decision: Decision) -> dict[str, int]:
        s = self._s
        if s.k8s_prefill_deployment and s.k8s_decode_deployment and decision.prefill is not None:
            assert decision.decode is not None
            return {s.k8s_prefill_deployment: decision.prefill, s.k8s_decode_deployment: decision.decode}
        return dict.fromkeys(s.k8s_deployments, target)

    async def current(self) -> int | None:
        name = self._s.k8s_deployments[0] if self._s.k8s_deployments else self._s.k8s_decode_deployment
        try:
            dep = await asyncio.to_thread(self._api.read_namespaced_deployment, name, self._s.k8s_namespace)
        except Exception as err:  # the API server's errors are many; none may stop the planner
            log.warning("kubernetes connector: cannot read deployment %s: %s", name, err)
            return None
        replicas = dep.spec.replicas
        return int(replicas) if replicas is not None else None

    async def scale(self, target: int, decision: Decision) -> ScaleResult:
        done: list[str] = []
        for name, replicas in self._targets(target, decision).items():
            body = {"spec": {"replicas": replicas}}
            try:
                await asyncio.to_thread(self._api.patch_namespaced_deployment, name, self._s.k8s_namespace, body)
            except Exception as err:
                log.warning("kubernetes connector: patch of %s failed: %s", name, err)
                return ScaleResult(target, False, f"patch {name} failed: {err}")
            done.append(f"{name}={replicas}")
        return ScaleResult(target, True, ", ".join(done))

    async def close(self) -> None:
        client = getattr(self._api, "api_client", None)
        if client is not None:
            await asyncio.to_thread(client.close)


def kubernetes_apps_api(host: str = "") -> Any:
    """An AppsV1Api: in-cluster config, else ~/.kube/config; `host` overrides the server URL."""
    try:
        from kubernetes import client, config
    except ImportError:
        raise ValueError("the kubernetes connector needs `pip install lightspeed[planner]`") from None
    if host:
        conf = client.Configuration()
        conf.host = host
        return client.AppsV1Api(client.ApiClient(conf))
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.AppsV1Api()


# ------------------------------------------------------------------ registry


ConnectorFactory = Callable[[ConnectorSettings, WorkerScaler | None, str], Connector]


def _local(settings: ConnectorSettings, scaler: WorkerScaler | None, host: str) -> Connector:
    if scaler is None:
        raise ValueError(
            "the local connector scales the workers of `lightspeed serve`: run `serve --planner` "
            "(a standalone planner uses --connector virtual or kubernetes)"
        )
    return LocalConnector(scaler)


def _virtual(settings: ConnectorSettings, scaler: WorkerScaler | None, host: str) -> Connector:
    return VirtualConnector(settings.virtual_dir, settings.ack_timeout)


def _kubernetes(settings: ConnectorSettings, scaler: WorkerScaler | None, host: str) -> Connector:
    return KubernetesConnector(kubernetes_apps_api(host), settings)


CONNECTORS: dict[str, ConnectorFactory] = {"local": _local, "virtual": _virtual, "kubernetes": _kubernetes}


def make_connector(
    name: str, settings: ConnectorSettings, scaler: WorkerScaler | None = None, k8s_host: str = ""
) -> Connector:
    factory = CONNECTORS.get(name)
    if factory is None:
        raise ValueError(f"connector must be one of {', '.join(CONNECTORS)}; got {name!r}")
    return factory(settings, scaler, k8s_host)
