"""Real etcd and NATS (JetStream) servers for tests, on free ports of 127.0.0.1 (or of a network
namespace's address). Each test that needs one asks for a fixture; a missing binary skips the
test with the package to install (.ci/run installs both)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

START_TIMEOUT_S = 15.0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def find_binary(name: str) -> str | None:
    """On PATH, or where Debian puts it (nats-server is in /usr/sbin, off a user's PATH)."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/local/sbin")


def require_binary(name: str, package: str) -> str:
    path = find_binary(name)
    if path is None:
        pytest.skip(f"{name} is not installed (apt-get install {package}; .ci/run installs it)")
    return path


def wait_port(host: str, port: int, proc: subprocess.Popen[bytes], log: Path, prefix: list[str]) -> None:
    """Until something accepts on host:port (inside the namespace of `prefix`, if any)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    probe = [*prefix, sys.executable, "-c", f"import socket; socket.create_connection(({host!r}, {port}), 0.5)"]
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        if prefix:
            if subprocess.run(probe, capture_output=True).returncode == 0:
                return
        else:
            with contextlib.suppress(OSError), socket.create_connection((host, port), 0.5):
                return
        time.sleep(0.05)
    raise RuntimeError(f"server on {host}:{port} did not start: {log.read_text()[-2000:]}")


class _Server:
    """A server process that tests may SIGKILL and start again on the same ports and data."""

    name = "server"

    def __init__(self, workdir: Path, host: str = "127.0.0.1", prefix: list[str] | None = None) -> None:
        self.workdir = workdir
        self.host = host
        self.prefix = prefix or []
        self.proc: subprocess.Popen[bytes] | None = None
        self.extra: list[str] = []  # more flags (TLS, auth) for the next start
        self.log = workdir / f"{self.name}.log"
        workdir.mkdir(parents=True, exist_ok=True)

    def command(self) -> list[str]:
        raise NotImplementedError

    @property
    def port(self) -> int:
        raise NotImplementedError

    def start(self) -> None:
        with self.log.open("ab") as out:
            cmd = [*self.prefix, *self.command(), *self.extra]
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        wait_port(self.host, self.port, self.proc, self.log, self.prefix)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def restart(self, wipe: bool = False) -> None:
        self.kill()
        if wipe:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        self.start()

    @property
    def data_dir(self) -> Path:
        return self.workdir / f"{self.name}-data"


class EtcdServer(_Server):
    name = "etcd"

    def __init__(self, workdir: Path, host: str = "127.0.0.1", prefix: list[str] | None = None) -> None:
        super().__init__(workdir, host, prefix)
        self.client_port = free_port() if not prefix else 2379
        self.peer_port = free_port() if not prefix else 2380

    @property
    def port(self) -> int:
        return self.client_port

    scheme = "http"  # "https" once started with TLS flags in `extra`

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.client_port}"

    def command(self) -> list[str]:
        peer = f"http://{self.host}:{self.peer_port}"  # peers stay plaintext: one member
        return [
            find_binary("etcd") or "etcd",
            "--name=test",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={self.url}",
            f"--advertise-client-urls={self.url}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=test={peer}",
            "--log-level=warn",
        ]


class NatsServer(_Server):
    name = "nats"

    def __init__(self, workdir: Path, host: str = "127.0.0.1", prefix: list[str] | None = None) -> None:
        super().__init__(workdir, host, prefix)
        self.client_port = free_port() if not prefix else 4222

    @property
    def port(self) -> int:
        return self.client_port

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.client_port}"

    def command(self) -> list[str]:
        return [
            find_binary("nats-server") or "nats-server",
            "-js",
            "-a",
            self.host,
            "-p",
            str(self.client_port),
            "-sd",
            str(self.data_dir),
        ]

    def start(self) -> None:
        super().start()
        time.sleep(0.2)  # JetStream comes up just after the port opens


@pytest.fixture
def etcd_server(tmp_path: Path) -> Iterator[EtcdServer]:
    require_binary("etcd", "etcd-server")
    server = EtcdServer(tmp_path / "etcd")
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    require_binary("nats-server", "nats-server")
    server = NatsServer(tmp_path / "nats")
    server.start()
    try:
        yield server
    finally:
        server.kill()


def child_env(**extra: str) -> dict[str, str]:
    """The test's environment for a child `lightspeed` process, plus `extra`."""
    env = dict(os.environ)
    env.update(extra)
    return env


def lightspeed_cmd(kind: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "lightspeed", kind, *args]


def start_process(cmd: list[str], log: Path, prefix: list[str] | None = None) -> subprocess.Popen[bytes]:
    """A `lightspeed` process (inside a network namespace when `prefix` is `ip netns exec NS`),
    its output in `log`; in its own session so a test can kill what it started."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [*(prefix or []), *cmd],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=child_env(PYTHONUNBUFFERED="1"),
        )


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cluster_flags(
    etcd_url: str, nats_url: str, namespace: str, ttl: float = 2.0, event_plane: str = "nats"
) -> list[str]:
    """Discovery on etcd; the event plane on NATS (or zmq, peer to peer, with `nats_url` unused)."""
    plane = ["--event-plane", "nats", "--nats-url", nats_url] if event_plane == "nats" else ["--event-plane", "zmq"]
    return [
        "--discovery",
        "etcd",
        "--etcd-endpoints",
        etcd_url,
        "--discovery-ttl",
        str(ttl),
        *plane,
        "--namespace",
        namespace,
    ]


@dataclass(frozen=True)
class Certs:
    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str


def make_certs(folder: Path, ip: str = "127.0.0.1") -> Certs:
    """A throwaway CA, a server certificate for `ip` and a client certificate (openssl)."""
    if find_binary("openssl") is None:
        pytest.skip("openssl is not installed")
    folder.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca",
        "-keyout", "ca.key", "-out", "ca.pem")  # fmt: skip
    (folder / "san.cnf").write_text(f"subjectAltName=IP:{ip}\nextendedKeyUsage=serverAuth,clientAuth\n")
    for name in ("server", "client"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
            "-out", f"{name}.csr")  # fmt: skip
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "1", "-extfile", "san.cnf", "-out", f"{name}.pem")  # fmt: skip
    return Certs(*(str(folder / f) for f in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")))
