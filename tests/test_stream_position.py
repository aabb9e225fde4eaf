"""PROTOCOL §5: a stream's position is fixed before the client can see it open. Every
event committed after the client has the SSE response headers (``EventSource``'s
``open``) or the WebSocket handshake's 101 (``open``) is delivered on it, even without
``Last-Event-ID``.

A burst of clients connects to one session while several publishers post events. For
each event the test knows when its ``POST`` was *sent*: an event whose request left after
a client had its headers was certainly committed after that moment, so the client must
read it. (Events whose request left earlier may or may not be owed; they are not
checked, so the check cannot blame a correct server.) Against a uvicorn process, which
writes the response headers the moment the application sends them.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from bench.clients import Endpoint, StreamClient, connect_all
from bench.run import wait_until
from tests.conftest import make_user, token_for

pytestmark = [pytest.mark.slow]

CLIENTS = 240
PUBLISHERS = 6


async def _run(base_url: str, session_id: str, token: str, transport: str) -> dict[str, Any]:
    host, port = "127.0.0.1", int(base_url.rsplit(":", 1)[1])
    prefix = f"/api/sessions/{session_id}/stream/" if transport == "sse" else f"/ws/sessions/{session_id}/"
    endpoint = Endpoint(host, port, f"{prefix}?token={token}", transport, origin=base_url)
    clients = [StreamClient(endpoint) for _ in range(CLIENTS)]
    sent: list[tuple[float, int]] = []  # (perf_counter when the POST left, its seq)
    stop = asyncio.Event()

    async with httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {token}"}) as http:

        async def publisher(k: int) -> None:
            n = 0
            while not stop.is_set():
                left = time.perf_counter()
                r = await http.post(
                    f"/api/sessions/{session_id}/events/",
                    json={"type": "test.tick", "properties": {"k": k, "n": n}}, timeout=30,
                )
                assert r.status_code == 201, r.text
                sent.append((left, int(r.json()["seq"])))
                n += 1

        publishing = [asyncio.create_task(publisher(k)) for k in range(PUBLISHERS)]
        await asyncio.sleep(0.5)  # publishing is under way when the burst starts
        # Three bursts, so that connects overlap publishing from start to end.
        for part in range(3):
            await connect_all(clients[part::3], CLIENTS, timeout=60)
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*publishing)
        last = max(seq for _, seq in sent)
        await wait_until(lambda: all(c.ended or (c.seqs and max(c.seqs) >= last) for c in clients), 30)
        await asyncio.gather(*(c.close() for c in clients))

    missed_by = 0
    missed = 0
    checked = 0
    for client in clients:
        assert client.error is None and client.headers_at, client.error
        got = set(client.seqs)
        owed = [seq for left, seq in sent if left > client.headers_at]
        checked += len(owed)
        lost = [seq for seq in owed if seq not in got]
        if lost:
            missed_by += 1
            missed += len(lost)
    return {"events": len(sent), "checked": checked, "missed": missed, "clients_missing": missed_by}


@pytest.mark.parametrize("transport", ["sse", "ws"])
def test_every_event_committed_after_open_is_delivered(servers: Any, transport: str) -> None:
    (server,) = servers(
        1, redis=True, ASGI_SERVER="uvicorn", TANDEM_MAX_CONNECTIONS_PER_USER="100000",
    )
    from sessions_app import services

    alice = make_user("alice")
    session = services.create_session(alice, title="position", agent="echo")
    result = asyncio.run(_run(server.url, str(session.id), token_for(alice), transport))
    # The check has teeth only if events were owed to clients that had just opened.
    assert result["checked"] > CLIENTS, result
    assert result["missed"] == 0, result
