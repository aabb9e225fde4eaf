"""Who is connected: the presence endpoint and presence.* events (PROTOCOL §3, §4, §6)."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from channels.db import database_sync_to_async

from events_app import presence
from tests.conftest import client_for, token_for
from tests.streamutil import SSEClient, WSClient, bind_runtime, create_shared_session, eventually, stream_path

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
async def session(alice: Any, bob: Any, carol: Any, charlie: Any) -> AsyncIterator[Any]:
    bind_runtime()
    yield await create_shared_session(alice)


async def get_presence(session_id: str, user: Any) -> Any:
    response = await database_sync_to_async(client_for(user).get)(f"/api/sessions/{session_id}/presence/")
    return response


async def presence_rows(session_id: str, user: Any) -> list[dict[str, Any]]:
    response = await get_presence(session_id, user)
    assert response.status_code == 200, response.content
    rows: list[dict[str, Any]] = response.json()
    return rows


async def test_presence_lists_connected_users_with_connections_and_transports(
    session: Any, alice: Any, bob: Any, carol: Any
) -> None:
    assert await presence_rows(session.id, carol) == []
    sse_a = SSEClient(stream_path(session.id), params={"token": token_for(bob)})
    await sse_a.connected()
    sse_b = SSEClient(stream_path(session.id), params={"token": token_for(bob)})
    await sse_b.connected()
    socket = WSClient(f"/ws/sessions/{session.id}/", params={"token": token_for(bob)})
    assert (await socket.connect())[0]
    await socket.until_type("server.connected")
    watcher = WSClient(f"/ws/sessions/{session.id}/", params={"token": token_for(alice)})
    assert (await watcher.connect())[0]
    await watcher.until_type("server.connected")

    async def settled() -> Any:
        rows = await presence_rows(session.id, carol)
        return rows if sum(r["connections"] for r in rows) == 4 else None

    rows = await eventually(settled)
    by_name = {r["user"]["username"]: r for r in rows}
    assert set(by_name) == {"alice", "bob"}
    assert by_name["bob"]["user"] == {"id": bob.pk, "username": "bob"}
    assert by_name["bob"]["connections"] == 3
    assert sorted(by_name["bob"]["transports"]) == ["sse", "ws"]
    assert by_name["alice"]["connections"] == 1 and by_name["alice"]["transports"] == ["ws"]
    assert by_name["alice"]["state"] == {}

    await socket.send({"type": "presence.update", "id": 1, "state": {"typing": True}})
    assert (await socket.reply(1))["type"] == "ack"

    async def typing() -> Any:
        rows = await presence_rows(session.id, carol)
        return [r for r in rows if r["state"] == {"typing": True}]

    assert [r["user"]["username"] for r in await eventually(typing)] == ["bob"]

    for client in (sse_a, sse_b):
        await client.close()
    await socket.disconnect()
    await watcher.disconnect()

    async def empty() -> bool:
        return await presence_rows(session.id, carol) == []

    await eventually(empty)


async def test_presence_is_not_shown_to_outsiders(session: Any, charlie: Any) -> None:
    response = await get_presence(session.id, charlie)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


async def test_joining_and_leaving_are_announced(session: Any, alice: Any, bob: Any) -> None:
    watcher = SSEClient(stream_path(session.id), params={"token": token_for(alice)})
    await watcher.connected()
    socket = WSClient(f"/ws/sessions/{session.id}/", params={"token": token_for(bob)})
    assert (await socket.connect())[0]
    hello = await socket.receive()
    connection_id = hello["properties"]["connection_id"]
    joined = (
        await watcher.until(
            lambda f: f.type == "presence.joined" and f.data["properties"]["connection_id"] == connection_id  # type: ignore[index]
        )
    )[-1]
    assert joined.id is None and joined.seq is None
    assert joined.data["properties"] == {  # type: ignore[index]
        "user": {"id": bob.pk, "username": "bob"}, "connection_id": connection_id, "transport": "ws",
    }
    await socket.disconnect()
    left = (
        await watcher.until(
            lambda f: f.type == "presence.left" and f.data["properties"]["connection_id"] == connection_id  # type: ignore[index]
        )
    )[-1]
    assert left.id is None and left.seq is None
    assert left.data["properties"]["user"] == {"id": bob.pk, "username": "bob"}  # type: ignore[index]
    assert left.data["properties"]["transport"] == "ws"  # type: ignore[index]
    await watcher.close()


async def test_an_sse_client_sees_its_own_join_and_others_leave(session: Any, alice: Any, carol: Any) -> None:
    watcher = WSClient(f"/ws/sessions/{session.id}/", params={"token": token_for(alice)})
    assert (await watcher.connect())[0]
    await watcher.until_type("server.connected")
    client = SSEClient(stream_path(session.id), params={"token": token_for(carol)})
    hello = await client.connected()
    connection_id = hello.data["properties"]["connection_id"]  # type: ignore[index]
    # Its own join, whatever else it sees first: alice's join may reach the hub after
    # carol's stream has subscribed, and then it is broadcast to carol too.
    await client.until(
        lambda f: f.type == "presence.joined" and f.data["properties"]["connection_id"] == connection_id  # type: ignore[index]
    )
    await watcher.seen(
        lambda d: d.get("type") == "presence.joined" and d["properties"]["connection_id"] == connection_id
    )
    await client.close()
    left = await watcher.seen(
        lambda d: d.get("type") == "presence.left" and d["properties"]["connection_id"] == connection_id
    )
    assert left["properties"]["transport"] == "sse"
    await watcher.disconnect()


async def test_user_level_streams_do_not_appear_in_presence(session: Any, alice: Any, bob: Any) -> None:
    client = SSEClient("/api/stream/", params={"token": token_for(bob)})
    await client.connected()
    assert await presence_rows(session.id, alice) == []
    await client.close()


@pytest.mark.redis
def test_two_deployments_sharing_one_redis_see_only_their_own_presence(
    servers: Any, shared_session: Any, alice: Any, bob: Any, sse_streams: Any
) -> None:
    # Two deployments told apart by TANDEM_CHANNEL_PREFIX on one Redis (and, to ask both
    # about the same session, one database): bob connected to one is present there only.
    from tests.conftest import REDIS_URL
    from tests.test_sse_real_socket import api_client

    (ours,) = servers(1, redis=True)
    theirs_env = {**servers.env(), "TANDEM_CHANNEL_PREFIX": f"{servers.env()['TANDEM_CHANNEL_PREFIX']}b"}
    (theirs,) = servers(1, **theirs_env)
    assert theirs_env["REDIS_URL"] == REDIS_URL
    sid = shared_session.id
    stream = sse_streams(ours.url, f"/api/sessions/{sid}/stream/", token=token_for(bob))
    stream.wait_for_type("server.connected")

    with api_client(ours, alice) as client:
        rows = client.get(f"/api/sessions/{sid}/presence/").json()
        assert [r["user"]["username"] for r in rows] == ["bob"]
    with api_client(theirs, alice) as client:
        response = client.get(f"/api/sessions/{sid}/presence/")
        assert response.status_code == 200, response.text
        assert response.json() == []


class _SlowWrites:
    """The presence store's Redis client, with every pipeline that writes an entry held
    back a moment before it goes out (a busy connection, a slow network)."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def pipeline(self, **kwargs: Any) -> Any:
        pipe = self._client.pipeline(**kwargs)
        execute = pipe.execute

        async def slow_execute() -> Any:
            if any(cmd[0][0] == "HSET" for cmd in pipe.command_stack):
                await asyncio.sleep(0.3)
            return await execute()

        pipe.execute = slow_execute
        return pipe


@pytest.mark.redis
async def test_a_stream_gone_while_its_entry_is_being_written_leaves_no_one_present(
    redis_layer: str, session: Any
) -> None:
    # A client that drops right after `server.connected`: its stream is cancelled while the
    # presence entry is still on its way to Redis, and the removal comes next. The removal
    # must not overtake the write (the entry would show a ghost until it expires).
    store = presence.store()
    assert isinstance(store, presence.RedisPresence)
    store._aredis = _SlowWrites(store._async())
    entry = {"user": {"id": 1, "username": "bob"}, "transport": "sse", "state": {}}
    joining = asyncio.ensure_future(presence.aput(session.id, "conn-1", entry))
    await asyncio.sleep(0)  # the write is queued
    joining.cancel()
    await presence.aremove(session.id, "conn-1")
    await asyncio.sleep(0.5)  # the held-back write has gone out
    assert presence.summary(session.id) == []
