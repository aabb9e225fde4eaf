"""Processes that die or are missing, seen by the ones that live: a killed server's
stream slots stop counting within ``TANDEM_LIVENESS_SECONDS``, and agents workers are
visible in ``/readyz``, ``/metrics`` and a session's health, with one log line per reply.
All with real server and worker processes on Redis."""
from __future__ import annotations

import re
import time
from typing import Any

import httpx
import pytest

from tests.conftest import free_port, start_worker, token_for, wait_until
from tests.test_sse_real_socket import api_client

pytestmark = [pytest.mark.slow, pytest.mark.redis]

LIVENESS = {"TANDEM_LIVENESS_SECONDS": "2"}


wait_for = wait_until  # one polling helper for the suite (tests/conftest.py)


def test_user_reconnects_every_stream_to_the_surviving_process_seconds_after_a_crash(
    servers: Any, shared_session: Any, bob: Any, sse_streams: Any
) -> None:
    limit = 5
    # Slots themselves lapse only after a minute: what frees them is the dead process.
    env = {"TANDEM_MAX_CONNECTIONS_PER_USER": str(limit), "TANDEM_PRESENCE_TTL_SECONDS": "60", **LIVENESS}
    server_a, server_b = servers(2, redis=True, **env)
    paths = [f"/api/sessions/{shared_session.id}/stream/", "/api/stream/"]
    tabs = [sse_streams(server_a.url, paths[i % 2], token=token_for(bob)) for i in range(limit)]
    for tab in tabs:
        tab.wait_for_type("server.connected")
    headers = {"Authorization": f"Bearer {token_for(bob)}"}
    refused = httpx.get(f"{server_b.url}{paths[0]}", headers=headers, timeout=5)
    assert refused.status_code == 429  # the limit holds across processes

    server_a.proc.kill()
    server_a.proc.wait()
    time.sleep(2.5)  # TANDEM_LIVENESS_SECONDS, and a little
    reopened = [sse_streams(server_b.url, paths[i % 2], token=token_for(bob)) for i in range(limit)]
    assert [tab.status for tab in reopened] == [200] * limit
    for tab in reopened:
        tab.wait_for_type("server.connected")
    # And the limit still holds for the live ones.
    assert httpx.get(f"{server_b.url}{paths[0]}", headers=headers, timeout=5).status_code == 429


def metric(server: Any, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=5).text
    found = re.search(rf"^{name} (\S+)$", text, re.M)
    assert found, name
    return float(found.group(1))


def reply_lines(process: Any, reply_id: str) -> list[str] | None:
    """The process's log lines about one reply, once both are there."""
    lines = [line for line in process.log().splitlines() if f"message={reply_id}" in line]
    return lines if len(lines) >= 2 else None


def test_worker_mode_reports_workers_queued_replies_and_reply_state(
    servers: Any, shared_session: Any, bob: Any
) -> None:
    (server,) = servers(1, redis=True, workers=1, **LIVENESS)
    sid = shared_session.id
    ready = httpx.get(f"{server.url}/readyz", timeout=5)
    assert ready.status_code == 200
    assert ready.json()["agents"] == {"mode": "worker", "queued": 0, "running": 0, "workers": 1, "status": "ok"}
    assert metric(server, "tandem_agent_workers") == 1

    servers.workers[0].proc.kill()  # no goodbye: its heartbeats just stop
    servers.workers[0].proc.wait()
    assert wait_for(lambda: httpx.get(f"{server.url}/readyz", timeout=5).json()["agents"]["workers"] == 0, timeout=5)
    with api_client(server, bob) as client:
        response = client.post(f"/api/sessions/{sid}/messages/", json={"parts": [{"type": "text", "text": "anyone?"}]})
        reply_id = response.json()["reply_id"]
        time.sleep(1.5)  # nothing takes it
        run = client.get(f"/api/sessions/{sid}/health/").json()["run"]
        assert run["message_id"] == reply_id and run["state"] == "queued" and run["started_at"] is None
        ready = httpx.get(f"{server.url}/readyz", timeout=5)
        # Still ready: the web process serves; the body says replies cannot run.
        assert ready.status_code == 200
        assert ready.json()["agents"] == {"mode": "worker", "queued": 1, "running": 0, "workers": 0, "status": "no_workers"}
        assert metric(server, "tandem_agent_workers") == 0
        assert metric(server, "tandem_replies_queued") == 1

        servers(0, redis=True, workers=1, **LIVENESS)
        worker = servers.workers[-1]

        def finished() -> bool:
            return client.get(f"/api/sessions/{sid}/health/").json()["run"] is None

        wait_for(finished, timeout=15)
        assert httpx.get(f"{server.url}/readyz", timeout=5).json()["agents"]["workers"] == 1
        assert metric(server, "tandem_replies_queued") == 0
    lines = wait_for(lambda: reply_lines(worker, reply_id), timeout=5)
    assert "reply started" in lines[0] and f"session={sid}" in lines[0] and "agent=echo" in lines[0]
    assert "reply ended" in lines[1] and "status=completed" in lines[1] and "duration=" in lines[1]


def test_health_shows_a_running_reply_with_its_start(
    servers: Any, shared_session: Any, bob: Any
) -> None:
    (server,) = servers(1, redis=True, workers=1, TANDEM_ECHO_DELAY_MS="200")
    sid = shared_session.id
    with api_client(server, bob) as client:
        client.post(f"/api/sessions/{sid}/messages/", json={"parts": [{"type": "text", "text": "a b c d e f g h"}]})

        def running() -> dict[str, Any] | None:
            run = client.get(f"/api/sessions/{sid}/health/").json()["run"]
            return run if run and run["state"] == "running" else None

        run = wait_for(running, timeout=10)
        assert run["started_at"].endswith("Z") and run["started_at"] >= run["queued_at"]
        assert metric(server, "tandem_replies_running") == 1


def test_inline_mode_logs_one_line_when_a_reply_starts_and_one_when_it_ends(
    servers: Any, shared_session: Any, bob: Any
) -> None:
    (server,) = servers(1)
    sid = shared_session.id
    with api_client(server, bob) as client:
        reply_id = client.post(f"/api/sessions/{sid}/messages/", json={"parts": [{"type": "text", "text": "hi"}]}).json()["reply_id"]
        wait_for(lambda: client.get(f"/api/sessions/{sid}/health/").json()["run"] is None, timeout=10)
        ready = httpx.get(f"{server.url}/readyz", timeout=5).json()
    assert ready["agents"] == {"mode": "inline", "queued": 0, "running": 0, "status": "ok"}
    lines = wait_for(lambda: reply_lines(server, reply_id), timeout=5)
    assert "reply started" in lines[0] and f"session={sid}" in lines[0]
    assert "reply ended" in lines[1] and "status=completed" in lines[1]


def test_a_worker_serves_its_own_metrics(servers: Any, shared_session: Any, bob: Any, tmp_path: Any) -> None:
    (server,) = servers(1, redis=True, workers=0, TANDEM_AGENT_MODE="worker")
    port = free_port()
    env = {**servers.env(), "TANDEM_AGENT_MODE": "worker"}
    worker = start_worker(env, tmp_path, args=("--metrics-port", str(port)))
    try:
        with api_client(server, bob) as client:
            sid = shared_session.id
            client.post(f"/api/sessions/{sid}/messages/", json={"parts": [{"type": "text", "text": "counted"}]})
            wait_for(lambda: client.get(f"/api/sessions/{sid}/health/").json()["run"] is None, timeout=15)
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert re.search(r"^tandem_active_replies 0\.0$", text, re.M)
        published = re.search(r"^tandem_events_published_total (\S+)$", text, re.M)
        assert published and float(published.group(1)) >= 3  # the reply's parts, completion, idle
    finally:
        worker.stop()
