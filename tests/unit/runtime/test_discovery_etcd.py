"""etcd discovery against a real etcd (3.4, Debian etcd-server) started on 127.0.0.1."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import AsyncGenerator
from pathlib import Path

import aetcd.exceptions
import pytest

from lightspeed.config import PlaneConfig
from lightspeed.protocol import WorkerCard
from lightspeed.runtime.discovery import DiscoveryEvent, DiscoverySpec, build_discovery
from lightspeed.runtime.discovery_etcd import Endpoint, EtcdDiscovery, parse_endpoints
from tests.integration.cluster_servers import (  # noqa: F401 (fixture)
    EtcdServer,
    etcd_server,
    free_port,
    make_certs,
    require_binary,
)


def card(iid: str, address: str = "10.0.0.1:5000") -> WorkerCard:
    return WorkerCard(instance_id=iid, model="m", address=address, namespace="t")


def discovery(server: EtcdServer, ttl: float = 2.0, name: str = "t") -> EtcdDiscovery:
    made = build_discovery("etcd", DiscoverySpec(path=server.url, name=name, ttl=ttl))
    assert isinstance(made, EtcdDiscovery)
    return made


async def next_event(watch: AsyncGenerator[DiscoveryEvent, None], timeout: float = 10.0) -> DiscoveryEvent:
    return await asyncio.wait_for(anext(watch), timeout)


def test_parse_endpoints() -> None:
    assert parse_endpoints("http://a:1, https://b:2,c:3") == [
        Endpoint("a", 1, False),
        Endpoint("b", 2, True),
        Endpoint("c", 3, False),
    ]
    assert parse_endpoints("http://a") == [Endpoint("a", 2379, False)]
    for bad in ("", ",", "ftp://a:1", "http://a:x"):
        with pytest.raises(ValueError, match="etcd_endpoints"):
            parse_endpoints(bad)


def test_config_requires_endpoints() -> None:
    with pytest.raises(ValueError, match="etcd_endpoints is required"):
        PlaneConfig(discovery="etcd")
    with pytest.raises(ValueError, match="etcd_cert and etcd_key go together"):
        PlaneConfig(discovery="etcd", etcd_endpoints="http://a:1", etcd_cert="c.pem")
    assert PlaneConfig(discovery="etcd", etcd_endpoints="http://a:1").etcd_endpoints == "http://a:1"


async def test_register_watch_deregister(etcd_server: EtcdServer) -> None:  # noqa: F811
    worker, frontend = discovery(etcd_server), discovery(etcd_server)
    other_ns = discovery(etcd_server, name="other")
    try:
        await worker.register(card("w1"))
        watch = frontend.watch()
        assert await next_event(watch) == DiscoveryEvent("put", "w1", card("w1"))
        await worker.register(card("w2"))
        assert await next_event(watch) == DiscoveryEvent("put", "w2", card("w2"))
        moved = card("w2", "10.0.0.2:6000")
        await worker.register(moved)  # a changed card is a put of the new one
        assert await next_event(watch) == DiscoveryEvent("put", "w2", moved)
        await worker.deregister("w1")
        assert await next_event(watch) == DiscoveryEvent("delete", "w1")
        assert [c.instance_id for c in await frontend.list_cards()] == ["w2"]
        assert await other_ns.list_cards() == []
        await worker.close()  # revokes the lease: w2 goes at once, not after the TTL
        assert await next_event(watch, timeout=1.0) == DiscoveryEvent("delete", "w2")
        await watch.aclose()
    finally:
        for d in (worker, frontend, other_ns):
            await d.close()


_REGISTER_AND_HANG = """
import asyncio, sys
from lightspeed.protocol import WorkerCard
from lightspeed.runtime.discovery import DiscoverySpec, build_discovery
import lightspeed.runtime.discovery_etcd

async def main():
    d = build_discovery("etcd", DiscoverySpec(path=sys.argv[1], name="t", ttl=2))
    await d.register(WorkerCard(instance_id="doomed", model="m", address="a:1", namespace="t"))
    print("registered", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_sigkilled_worker_expires_with_its_lease(etcd_server: EtcdServer) -> None:  # noqa: F811
    frontend = discovery(etcd_server)
    proc = subprocess.Popen([sys.executable, "-c", _REGISTER_AND_HANG, etcd_server.url], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert (await asyncio.to_thread(proc.stdout.readline)).strip() == b"registered"
        watch = frontend.watch()
        assert (await next_event(watch)).instance_id == "doomed"
        await asyncio.sleep(3.0)  # keep-alives hold it past its 2 s TTL while the process lives
        assert [c.instance_id for c in await frontend.list_cards()] == ["doomed"]
        proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        assert await next_event(watch) == DiscoveryEvent("delete", "doomed")
        # Gone within the TTL plus etcd's expiry check (~0.5 s), not at once and not never.
        assert time.monotonic() - killed < 4.0
        await watch.aclose()
    finally:
        proc.kill()
        proc.wait()
        await frontend.close()


async def test_reregisters_after_etcd_restart(etcd_server: EtcdServer) -> None:  # noqa: F811
    worker, frontend = discovery(etcd_server), discovery(etcd_server)
    try:
        await worker.register(card("w1"))
        watch = frontend.watch()
        assert await next_event(watch) == DiscoveryEvent("put", "w1", card("w1"))
        # A fresh data dir: every lease and key is gone, as after losing the etcd cluster.
        await asyncio.to_thread(etcd_server.restart, True)
        # The watch breaks and lists again; whether it sees w1 missing first depends on who is
        # faster, the worker's re-registration or the watcher's re-listing.
        await asyncio.sleep(0.1)
        await worker.register(card("w2"))
        seen = {"w1": card("w1")}
        while "w2" not in seen:
            event = await next_event(watch, 15.0)
            if event.kind == "put":
                assert event.card is not None
                seen[event.instance_id] = event.card
            else:
                seen.pop(event.instance_id)
        assert seen == {"w1": card("w1"), "w2": card("w2")}
        assert worker.leases_granted == 2
        assert [c.instance_id for c in await frontend.list_cards()] == ["w1", "w2"]
        await watch.aclose()
    finally:
        await worker.close()
        await frontend.close()


async def test_unreachable_etcd_retries_then_registers(etcd_server: EtcdServer) -> None:  # noqa: F811
    etcd_server.kill()
    worker = discovery(etcd_server)
    try:
        await worker.register(card("late"))  # does not raise: the keeper retries
        assert worker.leases_granted == 0
        await asyncio.to_thread(etcd_server.start)
        frontend = discovery(etcd_server)
        watch = frontend.watch()
        assert await next_event(watch, 15.0) == DiscoveryEvent("put", "late", card("late"))
        assert worker.leases_granted == 1
        await watch.aclose()
        await frontend.close()
    finally:
        await worker.close()


async def enable_auth(url: str, password: str) -> None:
    """etcd's own way (what `etcdctl user add root; auth enable` sends): a root user, then auth on."""
    import aetcd
    import aetcd.rpc as rpc

    endpoint = parse_endpoints(url)[0]
    async with aetcd.Client(endpoint.host, endpoint.port) as client:
        stub = rpc.AuthStub(client.channel)
        await stub.RoleAdd(rpc.AuthRoleAddRequest(name="root"))
        await stub.UserAdd(rpc.AuthUserAddRequest(name="root", password=password))
        await stub.UserGrantRole(rpc.AuthUserGrantRoleRequest(user="root", role="root"))
        await stub.AuthEnable(rpc.AuthEnableRequest())


async def test_user_and_password(etcd_server: EtcdServer) -> None:  # noqa: F811
    await enable_auth(etcd_server.url, "s3cret-pass")
    good = build_discovery("etcd", DiscoverySpec(etcd_server.url, "t", 2, user="root", password="s3cret-pass"))
    anonymous = discovery(etcd_server)
    try:
        await good.register(card("w1"))
        assert [c.instance_id for c in await good.list_cards()] == ["w1"]
        with pytest.raises(aetcd.exceptions.ClientError, match=r"^etcdserver: user name is empty$"):
            await anonymous.list_cards()
    finally:
        await good.close()
        await anonymous.close()


async def test_mutual_tls(tmp_path: Path) -> None:
    require_binary("etcd", "etcd-server")
    certs = make_certs(tmp_path / "certs")
    server = EtcdServer(tmp_path / "etcd")
    server.scheme = "https"
    server.extra = [
        f"--cert-file={certs.server_cert}",
        f"--key-file={certs.server_key}",
        f"--trusted-ca-file={certs.ca}",
        "--client-cert-auth",
    ]
    server.start()
    tls = DiscoverySpec(server.url, "t", 2, ca_file=certs.ca, cert_file=certs.client_cert, key_file=certs.client_key)
    worker, frontend = build_discovery("etcd", tls), build_discovery("etcd", tls)
    no_cert = build_discovery("etcd", DiscoverySpec(server.url, "t", 2, ca_file=certs.ca))
    try:
        watch = frontend.watch()
        await worker.register(card("w1"))
        assert await next_event(watch) == DiscoveryEvent("put", "w1", card("w1"))
        await watch.aclose()
        with pytest.raises(aetcd.exceptions.ConnectionFailedError):  # the handshake is refused
            await no_cert.list_cards()
    finally:
        for d in (worker, frontend, no_cert):
            await d.close()
        server.kill()


async def test_fails_over_to_the_next_endpoint(etcd_server: EtcdServer) -> None:  # noqa: F811
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    worker = build_discovery("etcd", DiscoverySpec(f"{dead},{etcd_server.url}", "t", 2))
    frontend = discovery(etcd_server)
    try:
        watch = frontend.watch()
        await worker.register(card("w1"))  # the first endpoint refuses; the keeper retries on the second
        assert await next_event(watch) == DiscoveryEvent("put", "w1", card("w1"))
        assert isinstance(worker, EtcdDiscovery) and worker.leases_granted == 1
        await watch.aclose()
    finally:
        await worker.close()
        await frontend.close()
