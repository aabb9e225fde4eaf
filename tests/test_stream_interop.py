"""Third-party clients against real server processes (daphne and uvicorn): the
``websockets`` client on paths with no stream and on refusals, httpx-sse on the first
event and on positions beyond the head."""
from __future__ import annotations

import json
import re
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect as ws_connect

from tests.conftest import token_for

SERVERS = ["daphne", "uvicorn"]


def ws_url(server: Any, path: str) -> str:
    return server.url.replace("http://", "ws://") + path


def assert_clean_log(server: Any) -> None:
    log = server.log()
    assert not re.search(r"Traceback|ERROR|Exception", log), log[-3000:]


# ---------------------------------------------------------------- item 13: no route


@pytest.mark.parametrize("asgi_server", SERVERS)
def test_websocket_handshake_on_a_path_with_no_stream_is_refused_not_500(
    asgi_server: str, servers: Any, alice: Any
) -> None:
    (server,) = servers(1, ASGI_SERVER=asgi_server)
    token = token_for(alice)
    # uvicorn implements the ASGI WebSocket Denial Response extension: a real 404 with the
    # error shape. daphne does not: a close before accept, which it answers with 403.
    expected = 404 if asgi_server == "uvicorn" else 403
    for path in ["/ws/stream", "/ws/sessions/", "/ws/sessions/x/y/", "/api/stream/",
                 "/api/sessions/", "/nothing/here/", "/"]:
        with pytest.raises(InvalidStatus) as refused:
            with ws_connect(ws_url(server, f"{path}?token={token}"), open_timeout=5):
                pass
        response = refused.value.response
        assert response.status_code == expected, (path, response.status_code, response.body)
        if asgi_server == "uvicorn":
            assert json.loads(response.body)["error"]["code"] == "not_found"
    # The streams themselves still open.
    with ws_connect(ws_url(server, f"/ws/stream/?token={token}"), open_timeout=5) as socket:
        assert json.loads(socket.recv(timeout=5))["type"] == "server.connected"
    assert_clean_log(server)


# ---------------------------------------------------------------- item 17


@pytest.mark.parametrize("asgi_server", SERVERS)
def test_websocket_refusals_and_ends_carry_the_error_code_as_close_reason(
    asgi_server: str, servers: Any, shared_session: Any, alice: Any, charlie: Any
) -> None:
    (server,) = servers(1, ASGI_SERVER=asgi_server)
    cases = [
        (f"/ws/sessions/{shared_session.id}/?token={token_for(charlie)}", 4404, "not_found"),
        (f"/ws/sessions/{shared_session.id}/?token=forged", 4401, "authentication_failed"),
        (f"/ws/sessions/{shared_session.id}/", 4401, "not_authenticated"),
        (f"/ws/sessions/{shared_session.id}/?token={token_for(alice)}&last_event_id=x", 4400, "bad_request"),
    ]
    for path, code, reason in cases:
        with ws_connect(ws_url(server, path), open_timeout=5) as socket:
            with pytest.raises(ConnectionClosed) as closed:
                socket.recv(timeout=5)
        received = closed.value.rcvd
        assert received is not None and received.code == code, (path, received)
        assert received.reason == reason, (path, received)
    # An open stream that ends says why too.
    url = ws_url(server, f"/ws/sessions/{shared_session.id}/?token={token_for(alice)}")
    with ws_connect(url, open_timeout=5) as socket:
        assert json.loads(socket.recv(timeout=5))["type"] == "server.connected"
        deleted = httpx.delete(
            f"{server.url}/api/sessions/{shared_session.id}/", headers={"Authorization": f"Bearer {token_for(alice)}"}
        )
        assert deleted.status_code == 204
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                socket.recv(timeout=5)
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4404, "session_deleted")
    assert_clean_log(server)


@pytest.mark.parametrize("asgi_server", SERVERS)
def test_httpx_sse_reads_json_from_the_first_event_with_retry(
    asgi_server: str, servers: Any, shared_session: Any, alice: Any
) -> None:
    (server,) = servers(1, ASGI_SERVER=asgi_server)
    headers = {"Authorization": f"Bearer {token_for(alice)}"}
    for path in [f"/api/sessions/{shared_session.id}/stream/", "/api/stream/"]:
        with httpx.Client(base_url=server.url, headers=headers, timeout=10) as client:
            with connect_sse(client, "GET", path) as source:
                first = next(source.iter_sse())
        # The usual client loop: every event's data is JSON, the first one included.
        assert json.loads(first.data)["type"] == "server.connected"
        assert first.retry == 3000


@pytest.mark.parametrize("asgi_server", SERVERS)
def test_positions_beyond_every_head_reset_instead_of_400(
    asgi_server: str, servers: Any, shared_session: Any, alice: Any
) -> None:
    (server,) = servers(1, ASGI_SERVER=asgi_server)
    head = shared_session.last_seq
    headers = {"Authorization": f"Bearer {token_for(alice)}"}
    path = f"/api/sessions/{shared_session.id}/stream/"
    with httpx.Client(base_url=server.url, headers=headers, timeout=10) as client:
        for position in ["9223372036854775808", str(2**64), "9" * 200, str(head + 1)]:
            with connect_sse(client, "GET", path, headers={"Last-Event-ID": position}) as source:
                events = source.iter_sse()
                hello, reset = json.loads(next(events).data), json.loads(next(events).data)
            assert hello["properties"]["resumed"] is False
            assert reset["type"] == "stream.reset", reset
            assert reset["properties"] == {"reason": "unknown_position", "last_seq": head}
        # Malformed: anything but ASCII digits.
        for position in ["-1", "+1", "1e3", "1_0", "0x10", "\uff11", "\u0663", "1.0"]:
            response = client.get(path, headers={"Last-Event-ID": position.encode()})
            assert response.status_code == 400, (position, response.text)
            assert response.json()["error"]["code"] == "bad_request"
    url = ws_url(server, f"{path.replace('/api/', '/ws/').replace('/stream/', '/')}"
                         f"?token={token_for(alice)}&last_event_id={'9' * 40}")
    with ws_connect(url, open_timeout=5) as socket:
        assert json.loads(socket.recv(timeout=5))["properties"]["resumed"] is False
        reset = json.loads(socket.recv(timeout=5))
    assert reset["type"] == "stream.reset" and reset["properties"]["reason"] == "unknown_position"
    assert_clean_log(server)
