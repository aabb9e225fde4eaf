"""A server process that stops tells its streams to reconnect, and they resume on
another process without loss: SSE bodies end cleanly (EventSource reconnects with
Last-Event-ID), WebSockets close with 4012."""
from __future__ import annotations

import asyncio
import signal
from typing import Any

import httpx
import pytest

from tests.conftest import token_for
from tests.streamutil import bind_runtime, create_shared_session
from tests.test_ws_stream import opened, ws


def publish(server: Any, user: Any, session_id: str, n: int, start: int) -> list[int]:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token_for(user)}"}, timeout=10) as client:
        return [
            client.post(f"/api/sessions/{session_id}/events/", json={"type": "task.progress", "properties": {"i": i}}).json()["seq"]
            for i in range(start, start + n)
        ]


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.parametrize("asgi_server", ["daphne", "uvicorn"])
def test_sigterm_ends_sse_streams_cleanly_and_they_resume_elsewhere(
    asgi_server: str, servers: Any, shared_session: Any, alice: Any, bob: Any, sse_streams: Any
) -> None:
    server_a, server_b = servers(2, redis=True, ASGI_SERVER=asgi_server)
    path = f"/api/sessions/{shared_session.id}/stream/"
    stream = sse_streams(server_a.url, path, token=token_for(alice))
    stream.wait_for_type("server.connected")
    first = publish(server_b, bob, shared_session.id, 5, 0)
    stream.wait_for_seq(first[-1])
    server_a.proc.send_signal(signal.SIGTERM)
    stream.wait_for(lambda _: stream.ended, timeout=10)  # the client is told at once
    # The server ends the body before it exits; under heavy load the process may exit
    # before the last bytes leave, which a client sees as a dropped connection. Either
    # way it reconnects, and what matters is that it then loses nothing.
    print(f"\n{asgi_server}: stream ended {'cleanly' if stream.error is None else f'with {stream.error!r}'}")
    assert server_a.proc.wait(timeout=15) is not None
    missed = publish(server_b, bob, shared_session.id, 5, 5)  # while the client is away
    last_seen = stream.seqs()[-1]
    resumed = sse_streams(server_b.url, path, token=token_for(alice), headers={"Last-Event-ID": str(last_seen)})
    resumed.wait_for_seq(missed[-1])
    assert stream.seqs() + resumed.seqs() == list(range(stream.seqs()[0], missed[-1] + 1))


@pytest.mark.django_db(transaction=True)
async def test_a_websocket_is_told_to_reconnect_when_its_server_stops(
    alice: Any, bob: Any, carol: Any, charlie: Any
) -> None:
    bind_runtime()
    session = await create_shared_session(alice)
    client = ws(session.id, bob)
    await opened(client)
    client.comm.future.cancel()  # what daphne does to every application on SIGTERM
    message = await asyncio.wait_for(client.comm.output_queue.get(), 5)
    while message["type"] != "websocket.close":
        message = await asyncio.wait_for(client.comm.output_queue.get(), 5)
    assert message["code"] == 4012
