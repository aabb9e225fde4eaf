"""PROTOCOL §8: the write rate per user and the open-stream limit per user, in one
process and across processes."""
from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from tests.conftest import client_for, token_for
from tests.helpers import assert_error
from tests.streamutil import bind_runtime, create_shared_session
from tests.test_sse_stream import sse
from tests.test_ws_stream import opened, ws


def publish(user: Any, session_id: str) -> Any:
    return client_for(user).post(
        f"/api/sessions/{session_id}/events/", {"type": "task.progress", "properties": {}}, format="json"
    )


# ---------------------------------------------------------------- the write rate


def fresh_minute(margin: float = 15.0) -> None:
    """Wait, if need be, until the current one-minute window has ``margin`` seconds left:
    the rate is counted in fixed windows, and a test whose writes straddle a window's end
    would see its count start again (CI saw a post accepted one second past the minute)."""
    left = 60 - time.time() % 60
    if left < margin:
        time.sleep(left + 0.05)


@pytest.mark.django_db
def test_writes_past_the_rate_get_429_with_retry_after(shared_session: Any, bob: Any, alice: Any, settings: Any) -> None:
    settings.TANDEM_RATE_WRITE = "3/min"
    fresh_minute()
    for _ in range(3):
        assert publish(bob, shared_session.id).status_code == 201
    refused = publish(bob, shared_session.id)
    error = assert_error(refused, 429, "rate_limited")
    wait = int(refused["Retry-After"])
    assert 1 <= wait <= 60 and error["details"]["retry_after"] == wait
    # Reads are not writes, and the limit is per user.
    assert client_for(bob).get(f"/api/sessions/{shared_session.id}/events/").status_code == 200
    assert publish(alice, shared_session.id).status_code == 201
    # Every kind of write counts: a message post is refused the same way.
    posted = client_for(bob).post(
        f"/api/sessions/{shared_session.id}/messages/", {"parts": [{"type": "text", "text": "hi"}]}, format="json"
    )
    assert_error(posted, 429, "rate_limited")


@pytest.mark.django_db
def test_auth_endpoints_are_not_throttled(alice: Any, settings: Any) -> None:
    from tests.conftest import PASSWORD

    settings.TANDEM_RATE_WRITE = "1/min"
    for _ in range(3):
        response = client_for(None).post("/api/auth/token/", {"username": "alice", "password": PASSWORD}, format="json")
        assert response.status_code == 200
        assert client_for(alice).post("/api/auth/ticket/", {}, format="json").status_code == 200


@pytest.mark.django_db(transaction=True)
async def test_websocket_writes_share_the_rate(alice: Any, bob: Any, carol: Any, charlie: Any, settings: Any) -> None:
    bind_runtime()
    session = await create_shared_session(alice)
    settings.TANDEM_RATE_WRITE = "2/min"
    fresh_minute()
    client = ws(session.id, bob)
    await opened(client)
    replies = []
    for i in range(3):
        await client.send({"type": "publish", "id": i, "event": {"type": "task.progress", "properties": {}}})
        replies.append(await client.reply(i))
    assert [r["type"] for r in replies] == ["ack", "ack", "error"]
    assert replies[2]["error"]["code"] == "rate_limited"
    await client.send({"type": "ping", "id": "p"})  # not a write, and the socket is open
    assert (await client.reply("p"))["type"] == "pong"
    await client.disconnect()


# ---------------------------------------------------------------- open streams


@pytest.mark.django_db(transaction=True)
async def test_streams_past_the_limit_get_429_and_closing_one_frees_a_slot(
    alice: Any, bob: Any, carol: Any, charlie: Any, settings: Any
) -> None:
    bind_runtime()
    session = await create_shared_session(alice)
    settings.TANDEM_MAX_CONNECTIONS_PER_USER = 2
    first, second = sse(session.id, bob), sse(None, bob)
    await first.connected()
    await second.connected()
    third = sse(session.id, bob)
    assert await third.open() == 429
    body = await third.json()
    assert body["error"]["code"] == "too_many_connections"
    refused = ws(session.id, bob)
    accepted, _ = await refused.connect()
    assert await refused.closed() == 4429
    other_user = sse(session.id, carol)  # the limit is per user
    await other_user.connected()
    await first.close()
    again = ws(session.id, bob)
    await opened(again)
    for client in (second, other_user):
        await client.close()
    await again.disconnect()


@pytest.mark.slow
@pytest.mark.redis
def test_the_limit_counts_streams_on_every_process_and_a_killed_process_frees_its_own(
    servers: Any, shared_session: Any, bob: Any, sse_streams: Any
) -> None:
    env = {"TANDEM_MAX_CONNECTIONS_PER_USER": "2", "TANDEM_PRESENCE_TTL_SECONDS": "2"}
    server_a, server_b = servers(2, redis=True, **env)
    path = f"/api/sessions/{shared_session.id}/stream/"
    on_a = sse_streams(server_a.url, path, token=token_for(bob))
    on_a.wait_for_type("server.connected")
    on_b = sse_streams(server_b.url, path, token=token_for(bob))
    on_b.wait_for_type("server.connected")
    refused = httpx.get(f"{server_b.url}{path}", headers={"Authorization": f"Bearer {token_for(bob)}"}, timeout=5)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_connections"
    server_a.proc.kill()  # its stream never says goodbye: the slot must lapse by itself
    killed = time.monotonic()
    deadline = killed + 15
    while True:
        with httpx.stream("GET", f"{server_b.url}{path}", headers={"Authorization": f"Bearer {token_for(bob)}"}, timeout=5) as response:
            if response.status_code == 200:
                break
            assert response.status_code == 429
        assert time.monotonic() < deadline, "the killed process's slot was never freed"
        time.sleep(0.2)
    print(f"\nslot of a killed process freed after {time.monotonic() - killed:.1f} s")
