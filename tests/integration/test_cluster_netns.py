"""Multi-host for real: three hosts made of network namespaces joined by a bridge, nothing on
loopback between them.

  host 0 (10.77.0.1): etcd, NATS (JetStream), the frontend
  host 1 (10.77.0.2): a mocker worker listening on 0.0.0.0, advertising 10.77.0.2
  host 2 (10.77.0.3): a mocker worker listening on 10.77.0.3

Each namespace has only its own loopback and its veth into the bridge (which lives in a fourth,
"switch" namespace, so no firewall of the test machine sits in the path), so every byte between
the processes crosses the namespace addresses. The test talks HTTP from inside host 0. The
namespaces are deleted after the test whatever happens; where creating them is not permitted
(no root, no CAP_SYS_ADMIN) the test is skipped with that reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.cluster_servers import (
    EtcdServer,
    NatsServer,
    cluster_flags,
    find_binary,
    lightspeed_cmd,
    require_binary,
    start_process,
    stop_process,
)

SUBNET = "10.77.0"
BS = 16
WORKER_ARGS = ["--engine", "mocker", "--block-size", str(BS), "--num-gpu-blocks", "512", "--speedup-ratio", "50"]


IP = find_binary("ip") or "ip"


def ip(*args: str) -> None:
    subprocess.run([IP, *args], check=True, capture_output=True, timeout=10)


@dataclass
class Hosts:
    names: list[str]  # namespace of host 0, 1, 2
    switch: str

    def address(self, host: int) -> str:
        return f"{SUBNET}.{host + 1}"

    def prefix(self, host: int) -> list[str]:
        return [IP, "netns", "exec", self.names[host]]


def _build(hosts: Hosts, tag: str) -> None:
    ip("netns", "add", hosts.switch)
    ip("-n", hosts.switch, "link", "add", "br0", "type", "bridge")
    ip("-n", hosts.switch, "link", "set", "br0", "up")
    for i, ns in enumerate(hosts.names):
        ip("netns", "add", ns)
        here, there = f"ls{tag}h{i}", f"ls{tag}s{i}"  # interface names: 15 characters at most
        ip("link", "add", here, "type", "veth", "peer", "name", there)
        ip("link", "set", here, "netns", ns)
        ip("link", "set", there, "netns", hosts.switch)
        ip("-n", hosts.switch, "link", "set", there, "master", "br0", "up")
        ip("-n", ns, "addr", "add", f"{hosts.address(i)}/24", "dev", here)
        ip("-n", ns, "link", "set", here, "up")
        ip("-n", ns, "link", "set", "lo", "up")


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    if find_binary("ip") is None:
        pytest.skip("the `ip` tool (iproute2) is not installed")
    tag = f"{os.getpid() % 100000:05d}"
    made = Hosts([f"lsh{tag}-{i}" for i in range(3)], f"lsw{tag}")
    try:
        try:
            _build(made, tag)
        except subprocess.CalledProcessError as err:
            if b"Operation not permitted" in err.stderr or b"Permission denied" in err.stderr:
                pytest.skip(f"network namespaces are not permitted here: {err.stderr.decode().strip()}")
            raise
        yield made
    finally:  # deleting a namespace deletes its veth ends and the bridge
        for ns in [*made.names, made.switch]:
            subprocess.run([IP, "netns", "del", ns], capture_output=True, timeout=10)


# Runs inside host 0: one completion per prompt, reporting the worker the KV router picked for it
# (its per-worker decision counter), plus /health.
_CLIENT = r"""
import json, re, sys, time, urllib.request
url, prompts = sys.argv[1], json.loads(sys.argv[2])

def decisions():
    text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
    return dict(re.findall(r'^lightspeed_router_decisions_total\{worker="([^"]+)"\} (\S+)$', text, re.M))

served = []
for prompt in prompts:
    before = decisions()
    body = json.dumps({"model": sys.argv[3], "prompt": prompt, "max_tokens": 3, "ignore_eos": True}).encode()
    req = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
    reply = json.loads(urllib.request.urlopen(req, timeout=30).read())
    after = decisions()
    served.append([w for w in after if after[w] != before.get(w)] + [reply["usage"]["completion_tokens"]])
health = json.loads(urllib.request.urlopen(url + "/health", timeout=5).read())
for _ in range(100):  # the routed prompts' blocks reach the index as KV events from both hosts
    text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
    indexed = float(re.search(r"^lightspeed_router_indexed_blocks (\S+)$", text, re.M).group(1))
    if indexed >= 2 * len(prompts):
        break
    time.sleep(0.1)
print(json.dumps({"served": served, "health": health, "indexed": indexed}))
"""


def in_host0(hosts: Hosts, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*hosts.prefix(0), *args], capture_output=True, text=True, timeout=timeout)


def wait_workers(hosts: Hosts, url: str, n: int) -> dict:
    probe = (
        "import json, sys, time, urllib.request\n"
        "for _ in range(100):\n"
        "    try:\n"
        f"        h = json.loads(urllib.request.urlopen({url!r} + '/health', timeout=2).read())\n"
        f"        if len(h.get('workers', [])) == {n}: print(json.dumps(h)); sys.exit(0)\n"
        "    except Exception: pass\n"
        "    time.sleep(0.2)\n"
        "sys.exit(1)\n"
    )
    result = in_host0(hosts, sys.executable, "-c", probe)
    assert result.returncode == 0, f"{n} workers never showed up: {result.stderr}"
    return json.loads(result.stdout)


@pytest.mark.parametrize("event_plane", ["nats", "zmq"])
def test_three_hosts_in_network_namespaces(hosts: Hosts, tmp_path: Path, event_plane: str) -> None:
    """NATS: the workers publish to the broker on host 0. zmq: the frontend on host 0 dials each
    worker's publisher at the address it advertised."""
    require_binary("etcd", "etcd-server")
    require_binary("nats-server", "nats-server")
    etcd = EtcdServer(tmp_path / "etcd", hosts.address(0), hosts.prefix(0))
    nats = NatsServer(tmp_path / "nats", hosts.address(0), hosts.prefix(0))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        etcd.start()
        nats.start()
        secret = ["--cluster-secret", "netns-test-cluster-secret-0123"]
        flags = [*cluster_flags(etcd.url, nats.url, "netns", 3, event_plane), *secret]
        url = f"http://{hosts.address(0)}:8000"
        front = ["--host", hosts.address(0), "--port", "8000", "--router-mode", "kv"]
        procs.append(start_process(lightspeed_cmd("frontend", *front, *flags), tmp_path / "fe.log", hosts.prefix(0)))
        w1 = ["--worker-host", "0.0.0.0", "--advertise-host", hosts.address(1)]
        procs.append(
            start_process(lightspeed_cmd("worker", *WORKER_ARGS, *w1, *flags), tmp_path / "w1.log", hosts.prefix(1))
        )
        w2 = ["--worker-host", hosts.address(2)]
        procs.append(
            start_process(lightspeed_cmd("worker", *WORKER_ARGS, *w2, *flags), tmp_path / "w2.log", hosts.prefix(2))
        )
        health = wait_workers(hosts, url, 2)
        hosts_of = {w["instance_id"]: w["address"].rsplit(":", 1)[0] for w in health["workers"]}
        assert sorted(hosts_of.values()) == [hosts.address(1), hosts.address(2)]

        prompts = [[7000 + 100 * k + i for i in range(2 * BS)] for k in range(16)]
        from tests.integration.conftest import MODEL

        result = in_host0(hosts, sys.executable, "-c", _CLIENT, url, json.dumps(prompts), MODEL)
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        served = report["served"]
        assert report["indexed"] >= 2 * len(prompts)
        assert all(len(s) == 2 and s[1] == 3 for s in served), served  # one worker each, 3 tokens each
        # Ties break at random: with 16 fresh prompts both workers serve (1 in 2^15 that one does all).
        assert {hosts_of[s[0]] for s in served} == {hosts.address(1), hosts.address(2)}
    finally:
        for proc in procs:
            stop_process(proc)
        etcd.kill()
        nats.kill()
