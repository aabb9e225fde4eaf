"""What real server and worker processes write (issue 10, items 6 and 24): no token or
ticket in any line, whatever the server and its log flags, and with
``TANDEM_LOG_FORMAT=json`` one JSON object per line from every process."""
from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest
import websockets

from tests.conftest import token_for

pytestmark = [pytest.mark.slow]

BAD_TOKEN = "eyJhbGciOiJIUzI1NiJ9.eyJmb3JnZWQiOnRydWV9.forgedsignaturefortest"
BAD_TICKET = "7:1zzzzz:notarealticketsignature"

# Each server with the log flags an operator might use, the recommended ones first.
SERVERS = {
    "uvicorn-info-no-access-log": ("uvicorn", "--no-access-log --log-level info"),
    "uvicorn-info-access-log": ("uvicorn", "--log-level info"),
    "uvicorn-debug-no-access-log": ("uvicorn", "--no-access-log --log-level debug"),
    "uvicorn-debug-access-log": ("uvicorn", "--log-level debug"),
    "uvicorn-trace": ("uvicorn", "--log-level trace"),  # dumps every ASGI scope and message
    "daphne-verbosity-1": ("daphne", "--verbosity 1"),
    "daphne-verbosity-2": ("daphne", "--verbosity 2"),
}


def _ws(url: str) -> str:
    """Open a WebSocket and read its first frame; the close or the refusal otherwise."""

    async def run() -> str:
        try:
            async with websockets.connect(url, open_timeout=5) as socket:
                return str(await asyncio.wait_for(socket.recv(), 5))
        except Exception as exc:  # refused handshakes and closes are part of the test
            return f"{type(exc).__name__}: {exc}"

    return asyncio.run(run())


def exercise(server: Any, session_id: str, user: Any) -> list[str]:
    """Streams opened every way a credential can sit in a URL, accepted and refused;
    returns the secrets used."""
    token = token_for(user)
    ticket = httpx.post(
        f"{server.url}/api/auth/ticket/", headers={"Authorization": f"Bearer {token}"}, timeout=5
    ).json()["ticket"]
    ticket2 = httpx.post(
        f"{server.url}/api/auth/ticket/", headers={"Authorization": f"Bearer {token}"}, timeout=5
    ).json()["ticket"]
    sse = f"{server.url}/api/sessions/{session_id}/stream/"
    for query in (f"token={token}", f"ticket={ticket}", f"types=message.*&ticket={ticket2}"):
        with httpx.stream("GET", f"{sse}?{query}", timeout=5) as response:
            assert response.status_code == 200
            next(response.iter_lines())
    for query in (f"token={BAD_TOKEN}", f"ticket={BAD_TICKET}"):
        assert httpx.get(f"{sse}?{query}", timeout=5).status_code == 401
    httpx.get(f"{server.url}/api/sessions/?token={token}", timeout=5)  # ignored on REST
    httpx.get(f"{server.url}/api/nowhere/?ticket={ticket}", timeout=5)  # no such path
    ws = f"ws://127.0.0.1:{server.port}"
    assert "server.connected" in _ws(f"{ws}/ws/sessions/{session_id}/?token={token}")
    assert "server.connected" in _ws(f"{ws}/ws/stream/?ticket={ticket}")
    assert "server.connected" not in _ws(f"{ws}/ws/sessions/{session_id}/?token={BAD_TOKEN}")
    assert "server.connected" not in _ws(f"{ws}/ws/stream/?ticket={BAD_TICKET}")
    _ws(f"{ws}/ws/nowhere/?ticket={ticket}")  # a path with no route: any answer, no secret logged
    _ws(f"{ws}/ws/stream?token={token}")
    return [token, ticket, ticket2, BAD_TOKEN, BAD_TICKET]


def assert_no_secret(output: str, secrets: list[str]) -> None:
    for secret in secrets:
        for piece in {secret, *secret.split("."), *secret.split(":")[1:]}:
            if len(piece) >= 6:
                assert piece not in output, f"{piece!r} in the log:\n{output[-4000:]}"


def wait_for_lines(server: Any, text: str, count: int) -> None:
    deadline = time.monotonic() + 10
    while server.log().count(text) < count and time.monotonic() < deadline:
        time.sleep(0.1)


@pytest.mark.parametrize("name", list(SERVERS))
def test_no_token_or_ticket_reaches_any_server_log_line(
    servers: Any, shared_session: Any, bob: Any, name: str
) -> None:
    kind, flags = SERVERS[name]
    (server,) = servers(1, ASGI_SERVER=kind, ASGI_SERVER_ARGS=flags)
    secrets = exercise(server, shared_session.id, bob)
    wait_for_lines(server, "[redacted]", 8)
    server.stop()
    output = server.log()
    assert "[redacted]" in output, output[-3000:]  # the streams were logged, credentials blanked
    assert_no_secret(output, secrets)
    if kind == "uvicorn" and "info" in flags:
        # uvicorn's own handshake lines are still there, only redacted.
        assert "[accepted]" in output and "ticket=[redacted]" in output


def json_lines(output: str) -> list[dict[str, Any]]:
    records = []
    for line in output.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r}") from None
        assert isinstance(record, dict), line
        assert {"time", "level", "logger", "message"} <= set(record), record
        records.append(record)
    return records


@pytest.mark.parametrize(
    "kind, flags",
    [
        ("uvicorn", ""),  # no extra flags at all: uvicorn's access log and info level
        ("uvicorn", "--no-access-log"),
        ("daphne", "--verbosity 1"),
    ],
)
def test_json_log_format_makes_every_line_of_every_process_a_json_object(
    servers: Any, shared_session: Any, bob: Any, kind: str, flags: str
) -> None:
    (server,) = servers(
        1, redis=True, workers=1, ASGI_SERVER=kind, ASGI_SERVER_ARGS=flags, TANDEM_LOG_FORMAT="json"
    )
    (worker,) = servers.workers
    secrets = exercise(server, shared_session.id, bob)
    # A reply run by the worker, so it logs while it works.
    headers = {"Authorization": f"Bearer {token_for(bob)}"}
    posted = httpx.post(
        f"{server.url}/api/sessions/{shared_session.id}/messages/",
        json={"parts": [{"type": "text", "text": "hello worker"}]}, headers=headers, timeout=5,
    )
    assert posted.status_code == 202, posted.text
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        status = httpx.get(f"{server.url}/api/sessions/{shared_session.id}/", headers=headers, timeout=5).json()
        if status["status"]["type"] == "idle":
            break
        time.sleep(0.1)
    wait_for_lines(server, "tandem.access", 10)
    server.stop()
    worker.stop()

    records = json_lines(server.log())
    worker_records = json_lines(worker.log())
    assert any(r["logger"] == "tandem.worker" for r in worker_records), worker.log()
    assert_no_secret(server.log() + worker.log(), secrets)

    access = [r for r in records if r["logger"] == "tandem.access"]
    assert len(access) >= 10, records
    for record in access:
        assert {"method", "path", "status", "duration_ms", "client"} <= set(record), record
        assert isinstance(record["duration_ms"], (int, float)) and record["duration_ms"] >= 0
    stream = next(r for r in access if r["path"].startswith(f"/api/sessions/{shared_session.id}/stream/?token="))
    assert stream["method"] == "GET" and stream["status"] == 200
    assert stream["path"].endswith("token=[redacted]")
    websocket = next(r for r in access if r["method"] == "WEBSOCKET" and r["status"] == 101)
    assert "[redacted]" in websocket["path"]
    if kind == "uvicorn":
        assert any(r["logger"] == "uvicorn.error" for r in records), records  # uvicorn's own lines
        if "--no-access-log" not in flags:
            uvicorn_access = [r for r in records if r["logger"] == "uvicorn.access"]
            assert uvicorn_access and all({"method", "path", "status", "client"} <= set(r) for r in uvicorn_access)
