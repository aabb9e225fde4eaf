"""The deployment layout of docs/DEPLOY.md, for real: nginx with deploy/nginx.conf.template
in front of two server processes, an agents worker and Redis. SSE arrives unbuffered,
WebSockets upgrade, and when a process dies the proxy sends reconnects to the other."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect as ws_connect

from tests.conftest import ROOT, free_port, token_for

pytestmark = [pytest.mark.slow, pytest.mark.redis]


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[Any]:
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).exists():  # a deployment test never skips: it fails, saying why
        pytest.fail("nginx is required (apt-get install nginx-light)")
    started: list[subprocess.Popen[bytes]] = []

    def start(upstreams: list[str]) -> str:
        port = free_port()
        (tmp_path / "temp").mkdir(exist_ok=True)
        config = (ROOT / "deploy" / "nginx.conf.template").read_text()
        for key, value in {
            "LISTEN": f"127.0.0.1:{port}", "PID_FILE": str(tmp_path / "nginx.pid"),
            "ERROR_LOG": str(tmp_path / "error.log"), "TEMP_DIR": str(tmp_path / "temp"),
            "UPSTREAMS": "\n        ".join(f"server {u} max_fails=1 fail_timeout=5s;" for u in upstreams),
        }.items():
            config = config.replace("{{" + key + "}}", value)
        if os.geteuid() == 0:
            config = "user root;\n" + config  # the test's temp files belong to root
        path = tmp_path / "nginx.conf"
        path.write_text(config)
        proc = subprocess.Popen([binary, "-c", str(path), "-g", "daemon off;"], stderr=subprocess.PIPE)
        started.append(proc)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return f"http://127.0.0.1:{port}"
            except OSError:
                assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
                time.sleep(0.05)
        raise AssertionError("nginx did not start")

    yield start
    for proc in started:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.parametrize("asgi_server", ["daphne", "uvicorn"])
def test_streams_and_sockets_through_nginx_survive_a_dead_process(
    asgi_server: str, servers: Any, nginx: Any, shared_session: Any, alice: Any, bob: Any, sse_streams: Any
) -> None:
    server_a, server_b = servers(2, redis=True, workers=1, ASGI_SERVER=asgi_server)
    proxy = nginx([f"127.0.0.1:{server_a.port}", f"127.0.0.1:{server_b.port}"])
    sid = shared_session.id
    headers = {"Authorization": f"Bearer {token_for(bob)}"}
    path = f"/api/sessions/{sid}/stream/"

    stream = sse_streams(proxy, path, token=token_for(alice))
    stream.wait_for_type("server.connected")
    with httpx.Client(base_url=proxy, headers=headers, timeout=10) as client:
        reply_id = client.post(f"/api/sessions/{sid}/messages/", json={"parts": [{"type": "text", "text": "through the proxy"}]}).json()["reply_id"]
        # Unbuffered: the reply's events arrive while it streams, not when a buffer fills.
        stream.wait_for_type("message.completed", message_id=reply_id, timeout=10)

        target = proxy.replace("http://", "ws://") + f"/ws/sessions/{sid}/?token={token_for(bob)}"
        with ws_connect(target, open_timeout=5) as socket_:
            assert '"server.connected"' in socket_.recv(timeout=5)
            socket_.send('{"type": "ping", "id": 1}')
            frames = []
            while not any('"pong"' in f for f in frames):
                frames.append(socket_.recv(timeout=5))  # presence.joined may come first

        # One process dies; new requests and streams are served by the other.
        server_a.proc.kill()
        server_a.proc.wait()
        last = stream.seqs()[-1]
        for i in range(3):
            assert client.post(f"/api/sessions/{sid}/events/", json={"type": "task.progress", "properties": {"i": i}}).status_code == 201
        head = client.get(f"/api/sessions/{sid}/").json()["last_seq"]
    resumed = sse_streams(proxy, path, token=token_for(alice), headers={"Last-Event-ID": str(last)})
    resumed.wait_for_seq(head)
    assert resumed.seqs() == list(range(last + 1, head + 1))
