"""Redis stopped or hung (SIGSTOP) under real server processes and agents workers, on a
redis-server of the test's own: replies posted meanwhile still complete with their full
text, health answers from the database, presence and new streams say 503 instead of
failing with a 500 or an empty 200."""
from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

from tests.conftest import token_for, wait_until
from tests.test_sse_real_socket import api_client

pytestmark = [pytest.mark.slow, pytest.mark.redis]

# A lease far shorter than the outage: a reply whose runner gave up would be reaped
# `interrupted` while Redis is still away.
OUTAGE_ENV = {"TANDEM_RUN_LEASE_SECONDS": "2", "TANDEM_HEARTBEAT_SECONDS": "1"}
OUTAGE_SECONDS = 4.0


def words(tag: str, n: int = 20) -> str:
    return " ".join(f"{tag}w{i}" for i in range(n))


def post(client: httpx.Client, session_id: str, text: str) -> str:
    response = client.post(f"/api/sessions/{session_id}/messages/", json={"parts": [{"type": "text", "text": text}]})
    assert response.status_code == 202, response.text
    return str(response.json()["reply_id"])


def reply(client: httpx.Client, session_id: str, reply_id: str) -> dict[str, Any]:
    messages = client.get(f"/api/sessions/{session_id}/messages/").json()["results"]
    return next(m for m in messages if m["id"] == reply_id)


wait_for = wait_until  # one polling helper for the suite (tests/conftest.py)


@pytest.mark.parametrize("outage", ["stopped", "hung"])
@pytest.mark.parametrize("mode", ["inline", "worker"])
def test_replies_posted_while_redis_is_away_complete_with_their_full_text(
    mode: str, outage: str, servers: Any, private_redis: Any, alice: Any
) -> None:
    workers = 1 if mode == "worker" else 0
    (server,) = servers(1, redis=True, workers=workers, REDIS_URL=private_redis.url, **OUTAGE_ENV)
    with api_client(server, alice) as client:
        sessions = [client.post("/api/sessions/", json={"title": f"outage {n}"}).json()["id"] for n in range(3)]
        private_redis.stop() if outage == "stopped" else private_redis.pause()
        posted = {sid: (text := words(sid[-6:]), post(client, sid, text)) for sid in sessions}
        time.sleep(OUTAGE_SECONDS)  # twice the lease: a runner that gave up is reaped by now
        private_redis.start() if outage == "stopped" else private_redis.resume()

        def all_ended() -> bool:
            return all(reply(client, sid, rid)["status"] != "streaming" for sid, (_, rid) in posted.items())

        wait_for(all_ended, timeout=30)
        for sid, (text, reply_id) in posted.items():
            message = reply(client, sid, reply_id)
            assert (message["status"], message.get("error")) == ("completed", None), message
            assert [p["text"] for p in message["parts"]] == [text]
            # The log holds the reply's events, and a stream opened now replays them.
            events = client.get(f"/api/sessions/{sid}/events/", params={"types": "message.completed"}).json()
            assert [e["properties"]["status"] for e in events["events"]] == ["completed"]
        sid, (text, reply_id) = next(iter(posted.items()))
        with client.stream("GET", f"/api/sessions/{sid}/stream/", headers={"Last-Event-ID": "0"}) as stream:
            assert stream.status_code == 200
            deltas = ""
            for line in stream.iter_lines():
                if not line.startswith("data: "):
                    continue
                event = json.loads(line[6:])
                props = event["properties"]
                if event["type"] == "message.part.updated" and props["message_id"] == reply_id and "delta" in props:
                    deltas += props["delta"]
                if event["type"] == "message.completed":
                    break
        assert deltas == text


def test_health_answers_and_presence_refuses_while_redis_is_down(
    servers: Any, private_redis: Any, shared_session: Any, bob: Any
) -> None:
    (server,) = servers(1, redis=True, REDIS_URL=private_redis.url)
    sid = shared_session.id
    with api_client(server, bob) as client:
        assert client.get(f"/api/sessions/{sid}/health/").json()["connections"] == 0
        private_redis.stop()
        health = client.get(f"/api/sessions/{sid}/health/")
        assert health.status_code == 200, health.text
        # From the database; who is connected is unknown without Redis, not zero.
        assert health.json() == {"status": {"type": "idle"}, "last_seq": 3, "connections": None, "run": None}
        presence = client.get(f"/api/sessions/{sid}/presence/")
        assert presence.status_code == 503, presence.text
        assert presence.json()["error"]["code"] == "unavailable"
        assert int(presence.headers["Retry-After"]) >= 1
        private_redis.start()
        assert wait_for(lambda: client.get(f"/api/sessions/{sid}/presence/").status_code == 200, timeout=10)
        assert client.get(f"/api/sessions/{sid}/health/").json()["connections"] == 0


def test_health_and_presence_answer_promptly_while_redis_hangs(
    servers: Any, private_redis: Any, shared_session: Any, bob: Any
) -> None:
    (server,) = servers(1, redis=True, REDIS_URL=private_redis.url)
    sid = shared_session.id
    with api_client(server, bob) as client:
        assert client.get(f"/api/sessions/{sid}/presence/").status_code == 200
        private_redis.pause()
        try:
            # Bounded by the Redis client's timeouts, never held for the whole hang.
            health = client.get(f"/api/sessions/{sid}/health/", timeout=10)
            assert health.status_code == 200 and health.json()["connections"] is None
            presence = client.get(f"/api/sessions/{sid}/presence/", timeout=10)
            assert presence.status_code == 503 and presence.json()["error"]["code"] == "unavailable"
        finally:
            private_redis.resume()


@pytest.mark.parametrize("path", ["/api/sessions/{sid}/stream/", "/api/stream/"])
def test_sse_stream_opened_while_redis_is_down_is_refused_with_503_and_retry_after(
    path: str, servers: Any, private_redis: Any, shared_session: Any, alice: Any
) -> None:
    (server,) = servers(1, redis=True, REDIS_URL=private_redis.url)
    url = server.url + path.format(sid=shared_session.id)
    headers = {"Authorization": f"Bearer {token_for(alice)}"}
    private_redis.stop()
    response = httpx.get(url, headers=headers, timeout=10)
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["code"] == "unavailable"
    assert int(response.headers["Retry-After"]) >= 1
    private_redis.start()

    def opens() -> bool:
        with httpx.stream("GET", url, headers=headers, timeout=10) as stream:
            if stream.status_code != 200:
                return False
            line = next(line for line in stream.iter_lines() if line.startswith("data: "))
            return bool(json.loads(line[6:])["type"] == "server.connected")

    assert wait_for(opens, timeout=15)


@pytest.mark.parametrize("path", ["/ws/sessions/{sid}/", "/ws/stream/"])
def test_websocket_opened_while_redis_is_down_closes_with_4503(
    path: str, servers: Any, private_redis: Any, shared_session: Any, alice: Any
) -> None:
    (server,) = servers(1, redis=True, REDIS_URL=private_redis.url)
    url = server.url.replace("http://", "ws://") + path.format(sid=shared_session.id) + f"?token={token_for(alice)}"
    private_redis.stop()
    with ws_connect(url, open_timeout=10) as socket:
        with pytest.raises(ConnectionClosed) as closed:
            socket.recv(timeout=10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4503
    private_redis.start()

    def opens() -> bool:
        with ws_connect(url, open_timeout=10) as socket:
            try:
                return bool(json.loads(socket.recv(timeout=10))["type"] == "server.connected")
            except ConnectionClosed:
                return False

    assert wait_for(opens, timeout=15)


def test_doc_socket_opened_while_redis_is_down_closes_with_4503(
    servers: Any, private_redis: Any, shared_session: Any, alice: Any
) -> None:
    # The shared document's socket is refused like the event sockets: 4503, reconnect
    # shortly (its edits reach the other processes' editors through Redis).
    (server,) = servers(1, redis=True, REDIS_URL=private_redis.url)
    url = server.url.replace("http://", "ws://") + f"/ws/sessions/{shared_session.id}/doc/?token={token_for(alice)}"
    private_redis.stop()
    with ws_connect(url, open_timeout=10) as socket:
        with pytest.raises(ConnectionClosed) as closed:
            socket.recv(timeout=10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4503
    assert closed.value.rcvd.reason == "unavailable"
    private_redis.start()

    def opens() -> bool:
        with ws_connect(url, open_timeout=10) as socket:
            try:
                first = socket.recv(timeout=10)
            except ConnectionClosed:
                return False
            return isinstance(first, bytes) and first[:2] == b"\x00\x00"  # sync step 1

    assert wait_for(opens, timeout=15)
