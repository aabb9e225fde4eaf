"""The probes against real server processes: they answer whatever the Host header says
(load balancers and Prometheus probe by IP) while nothing else does, and ``/readyz``
answers within a probe's 1 s timeout, naming what fails, when the database or Redis is
down or hangs, with one log line per change of state rather than an ERROR per probe."""
from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
import redis
from django.db import connection

from tests import conftest
from tests.conftest import free_port, wait_until

pytestmark = [pytest.mark.slow]

PROBE_TIMEOUT = 1.0  # what Kubernetes and most load balancers allow a probe by default
PROBES = ["/healthz", "/readyz", "/metrics"]
PRODUCTION = {
    "DEBUG": "false",
    "SECRET_KEY": "probe-test-" + "k" * 50,
    "ALLOWED_HOSTS": "tandem.example.com",
}


def error_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if " ERROR " in line or "Traceback" in line or line.startswith("ERROR")]


@pytest.mark.parametrize("asgi_server", ["daphne", "uvicorn"])
def test_probes_answer_by_ip_and_unknown_hosts_get_400_without_a_traceback(asgi_server: str, servers: Any) -> None:
    (server,) = servers(1, ASGI_SERVER=asgi_server, **PRODUCTION)
    # 127.0.0.1 itself is not in ALLOWED_HOSTS here, and neither is a pod's address.
    for host in (f"127.0.0.1:{server.port}", "10.0.0.5:8000", "10.0.0.5"):
        for path in PROBES:
            response = httpx.get(server.url + path, headers={"Host": host}, timeout=PROBE_TIMEOUT)
            assert response.status_code == 200, (host, path, response.text)
    assert httpx.get(server.url + "/readyz", headers={"Host": "10.0.0.5:8000"}).json()["database"] == "ok"
    assert "tandem_open_streams" in httpx.get(server.url + "/metrics", headers={"Host": "10.0.0.5:8000"}).text

    api = httpx.get(server.url + "/api/sessions/", headers={"Host": "10.0.0.5:8000"})
    assert api.status_code == 400
    assert api.json()["error"]["code"] == "bad_request"
    assert httpx.get(server.url + "/", headers={"Host": "10.0.0.5:8000"}).status_code == 400
    assert httpx.get(server.url + "/admin/login/", headers={"Host": "10.0.0.5:8000"}).status_code == 400
    # Not a redirect to https://10.0.0.5…: the host is refused before the HTTPS redirect.
    assert httpx.post(server.url + "/api/auth/token/", headers={"Host": "evil.example"}, json={}).status_code == 400
    # The host this deployment serves still works (through the proxy, over HTTPS).
    allowed = httpx.get(server.url + "/api/sessions/", headers={"Host": "tandem.example.com", "X-Forwarded-Proto": "https"})
    assert allowed.status_code == 401

    log = server.log()
    assert error_lines(log) == [], log
    warnings = [line for line in log.splitlines() if "WARNING" in line and "10.0.0.5" in line]
    assert 1 <= len(warnings) <= 4  # one line per refused request, no traceback


# ---------------------------------------------------------------- /readyz with a dependency down


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[Any]:
    """A redis-server of this test's own, on a free port, that the test may stop, freeze
    (SIGSTOP) and start again. The machine's Redis is shared and left alone."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is required")
    port = free_port()

    class OwnRedis:
        url = f"redis://127.0.0.1:{port}/0"
        proc: subprocess.Popen[bytes] | None = None

        def start(self) -> None:
            self.proc = subprocess.Popen(
                [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            wait_until(lambda: self._pings(), timeout=10)

        def _pings(self) -> bool:
            try:
                return bool(redis.Redis(port=port, socket_connect_timeout=0.2).ping())
            except redis.ConnectionError:
                return False

        def stop(self) -> None:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGCONT)
                self.proc.terminate()
                self.proc.wait(timeout=10)

    own = OwnRedis()
    own.start()
    yield own
    own.stop()


def probe(server: Any) -> httpx.Response:
    return httpx.get(server.url + "/readyz", timeout=PROBE_TIMEOUT)


def readiness_lines(server: Any) -> list[str]:
    return [line for line in server.log().splitlines() if "tandem.readiness" in line]


@pytest.mark.redis
def test_readyz_names_redis_within_a_probe_timeout_when_it_stops_or_hangs(servers: Any, own_redis: Any) -> None:
    (server,) = servers(1, ASGI_SERVER="uvicorn", redis=True, REDIS_URL=own_redis.url)
    assert probe(server).status_code == 200

    assert own_redis.proc is not None
    own_redis.proc.send_signal(signal.SIGSTOP)  # hangs: connections open, nothing answers
    for _ in range(3):
        response = probe(server)
        assert response.status_code == 503
        assert response.json()["error"]["details"]["failing"] == ["channel_layer"]

    own_redis.stop()  # down: connections refused
    for _ in range(3):
        response = probe(server)
        assert response.status_code == 503
        assert response.json()["error"]["details"]["failing"] == ["channel_layer"]

    own_redis.start()
    wait_until(lambda: probe(server).status_code == 200, timeout=10, interval=0.2)
    lines = readiness_lines(server)
    # Six failed probes, one warning; and one line when it is ready again.
    assert [line for line in lines if "WARNING" in line and "channel_layer" in line] == lines[:1], lines
    assert len(lines) == 2 and "Ready again" in lines[1], lines
    assert not [line for line in server.log().splitlines() if "/readyz" in line and "ERROR" in line]


class TcpProxy:
    """127.0.0.1:<port> → ``target``. ``blackhole()`` makes it a dead network: it keeps
    accepting connections but nothing passes either way, as when a database host
    vanishes; ``restore()`` forwards again."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.forwarding = threading.Event()
        self.forwarding.set()
        self.closed = False
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.sockets.append(client)
            if not self.forwarding.is_set():
                continue  # accepted, never answered
            upstream = socket.create_connection(self.target)
            self.sockets.append(upstream)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                if not self.forwarding.is_set():
                    self.forwarding.wait()  # frozen mid-connection, like a partition
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def blackhole(self) -> None:
        self.forwarding.clear()

    def restore(self) -> None:
        self.forwarding.set()

    def close(self) -> None:
        self.closed = True
        self.forwarding.set()
        self.listener.close()
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()


@pytest.mark.postgres_only
def test_readyz_names_the_database_within_a_probe_timeout_when_it_becomes_unreachable(servers: Any) -> None:
    if connection.vendor != "postgresql":
        pytest.skip("the database behind a proxy is PostgreSQL (run with DATABASE_URL=postgres://…)")
    url = urlsplit(conftest.test_database_url())
    proxy = TcpProxy((url.hostname or "127.0.0.1", url.port or 5432))
    netloc = url.netloc.rpartition("@")[0] + "@" if "@" in url.netloc else ""
    proxied = urlunsplit(url._replace(netloc=f"{netloc}127.0.0.1:{proxy.port}"))
    server = None
    try:
        (server,) = servers(1, ASGI_SERVER="uvicorn", DATABASE_URL=proxied)
        assert probe(server).status_code == 200

        proxy.blackhole()
        for _ in range(3):
            response = probe(server)
            assert response.status_code == 503
            assert response.json()["error"]["details"]["failing"] == ["database"]

        proxy.restore()
        wait_until(lambda: probe(server).status_code == 200, timeout=10, interval=0.2)
        lines = readiness_lines(server)
        assert len(lines) == 2, lines
        assert "WARNING" in lines[0] and "database" in lines[0]
        assert "Ready again" in lines[1]
        assert not [line for line in server.log().splitlines() if "/readyz" in line and "ERROR" in line]
    finally:
        if server is not None:
            server.stop()  # first: its connections go through the proxy
        proxy.close()
