"""A server process that stops tells its streams to reconnect, and they resume on
another process without loss: SSE bodies end cleanly (EventSource reconnects with
Last-Event-ID), WebSockets close with 4012."""
from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import httpx
import orjson
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

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


@pytest.mark.slow
@pytest.mark.parametrize("asgi_server", ["daphne", "uvicorn"])
def test_sigterm_ends_every_stream_at_once_and_logs_no_error(
    asgi_server: str, servers: Any, shared_session: Any, alice: Any, bob: Any, sse_streams: Any
) -> None:
    """uvicorn waits for open connections before it exits; the streams must end as soon
    as the signal comes, not when its --timeout-graceful-shutdown (5 s here) runs out
    and it cancels them with tracebacks."""
    (server,) = servers(1, ASGI_SERVER=asgi_server)
    session_stream = sse_streams(server.url, f"/api/sessions/{shared_session.id}/stream/", token=token_for(alice))
    user_stream = sse_streams(server.url, "/api/stream/", token=token_for(bob))
    for stream in (session_stream, user_stream):
        stream.wait_for_type("server.connected")
    with ws_connect(f"ws://127.0.0.1:{server.port}/ws/sessions/{shared_session.id}/?token={token_for(bob)}") as socket:
        assert orjson.loads(socket.recv(timeout=5))["type"] == "server.connected"

        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                socket.recv(timeout=10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4012  # reconnect elsewhere
    for stream in (session_stream, user_stream):
        stream.wait_for(lambda _: stream.ended, timeout=10)
        assert stream.error is None  # the body ended cleanly: EventSource reconnects
    server.proc.wait(timeout=10)
    assert time.monotonic() - started < 3, "the server waited for its streams instead of ending them"
    log = server.log()
    assert not [line for line in log.splitlines() if "ERROR" in line or "Traceback" in line or "Cancel" in line], log
