"""Nothing is left behind when a stream ends: no hub listeners or groups, no channel-layer
group membership, no tasks of the connection, no presence — in memory and on Redis."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer

from events_app import fanout, groups, presence
from tests.conftest import token_for
from tests.streamutil import (
    SSEClient,
    WSClient,
    bind_runtime,
    create_shared_session,
    eventually,
    publish_many,
    stream_groups,
    stream_path,
)

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
async def session(alice: Any, bob: Any, carol: Any, charlie: Any) -> AsyncIterator[Any]:
    bind_runtime()
    yield await create_shared_session(alice)


def layer_groups() -> set[str]:
    """Groups the channel layer holds for this process (in memory or Redis pub/sub)."""
    layer = get_channel_layer()
    if hasattr(layer, "_get_layer"):  # RedisPubSubChannelLayer: one per event loop
        loop_layer = layer._get_layer()
        subscribed = set().union(*(s._subscribed_to for s in loop_layer._shards))
        return set(loop_layer.groups) | {
            s.decode() if isinstance(s, bytes) else s for s in subscribed if "__group__" in str(s)
        }
    return {g for g, members in layer.groups.items() if members}


async def open_sse(session_id: str | None, user: Any) -> Callable[[], Awaitable[None]]:
    client = SSEClient(stream_path(session_id), params={"token": token_for(user)})
    await client.connected()
    return client.close


async def open_ws(session_id: str | None, user: Any) -> Callable[[], Awaitable[None]]:
    path = f"/ws/sessions/{session_id}/" if session_id else "/ws/stream/"
    client = WSClient(path, params={"token": token_for(user)})
    accepted, _ = await client.connect()
    assert accepted
    assert (await client.receive())["type"] == "server.connected"
    return client.disconnect


def session_groups(session_id: str) -> set[str]:
    return {g for g in layer_groups() if session_id in g}


async def assert_clean(session_id: str, baseline: set[asyncio.Task[Any]], user_id: int | None = None) -> None:
    hub = fanout.get_hub()
    group = groups.session_group(session_id)
    await eventually(lambda: group not in hub.groups)
    assert all(group not in g and not members for g, members in hub.groups.items() if session_id in g)
    assert session_id not in hub.group_session.values() and group not in hub.heads
    if user_id is not None:
        assert groups.user_group(user_id) not in hub.groups
    assert not stream_groups(hub), hub.groups
    assert session_groups(session_id) == set()
    await eventually(lambda: presence.summary(session_id) == [])
    leftover = {t for t in asyncio.all_tasks() if not t.done()} - baseline - {asyncio.current_task()}
    assert not leftover, leftover


async def warm_up(session_id: str, user: Any) -> set[asyncio.Task[Any]]:
    """Open and close one stream so the process-wide tasks (hub reader, head check,
    outbox, housekeeping) exist; the tasks running after that are the baseline."""
    close = await open_sse(session_id, user)
    await publish_many(session_id, 1)
    await close()
    await eventually(lambda: groups.session_group(session_id) not in fanout.get_hub().groups)
    return {t for t in asyncio.all_tasks() if not t.done()}


@pytest.mark.parametrize("opener", [open_sse, open_ws], ids=["sse", "ws"])
async def test_session_stream_leaves_nothing_behind(session: Any, alice: Any, bob: Any, opener: Any) -> None:
    baseline = await warm_up(session.id, alice)
    closers = [await opener(session.id, alice), await opener(session.id, bob)]
    hub = fanout.get_hub()
    group = groups.session_group(session.id)
    assert len(hub.groups[group]) == 2
    assert session_groups(session.id)  # the hub's one subscription
    await eventually(lambda: len(presence.summary(session.id)) == 2)
    await publish_many(session.id, 3)
    for close in closers:
        await close()
    await assert_clean(session.id, baseline)


@pytest.mark.parametrize("opener", [open_sse, open_ws], ids=["sse", "ws"])
async def test_user_stream_leaves_nothing_behind(session: Any, alice: Any, bob: Any, opener: Any) -> None:
    baseline = await warm_up(session.id, alice)
    close = await opener(None, bob)
    hub = fanout.get_hub()
    assert groups.user_group(bob.pk) in hub.groups and groups.session_group(session.id) in hub.groups
    await close()
    await assert_clean(session.id, baseline, user_id=bob.pk)


async def test_streams_ended_by_the_server_leave_nothing_behind(session: Any, alice: Any, bob: Any) -> None:
    from sessions_app import services

    baseline = await warm_up(session.id, alice)
    sse_client = SSEClient(stream_path(session.id), params={"token": token_for(bob)})
    await sse_client.connected()
    ws_client = WSClient(f"/ws/sessions/{session.id}/", params={"token": token_for(bob)})
    assert (await ws_client.connect())[0]
    await database_sync_to_async(services.remove_member)(session, username="bob")
    await sse_client.ends()
    assert await ws_client.closed() == 4403
    await ws_client.disconnect()
    await sse_client.close()
    await assert_clean(session.id, baseline)


async def test_a_removed_members_user_stream_leaves_that_session_and_follows_the_others(
    session: Any, alice: Any, bob: Any
) -> None:
    from sessions_app import services

    other = await create_shared_session(alice)
    client = SSEClient(stream_path(None), params={"token": token_for(bob)})
    await client.connected()
    hub = fanout.get_hub()
    assert groups.session_group(session.id) in hub.groups
    await database_sync_to_async(services.remove_member)(session, username="bob")
    await eventually(lambda: groups.session_group(session.id) not in hub.groups)
    await publish_many(session.id, 1)
    [seq] = await publish_many(other.id, 1)
    frames = await client.until(lambda f: (f.data or {}).get("session_id") == other.id and f.seq == seq)
    # The removal's own event is the last of that session this stream sees.
    seen = [f.type for f in frames if (f.data or {}).get("session_id") == session.id]
    assert seen[-1:] == ["member.removed"]
    await client.close()


async def test_one_layer_subscription_per_session_however_many_streams(session: Any, alice: Any, bob: Any, carol: Any) -> None:
    closers = [await open_sse(session.id, u) for u in (alice, bob, carol)]
    closers += [await open_ws(session.id, u) for u in (alice, bob)]
    assert len(fanout.get_hub().groups[groups.session_group(session.id)]) == 5
    assert len(session_groups(session.id)) == 1
    for close in closers:
        await close()
    await eventually(lambda: not session_groups(session.id))


@pytest.mark.redis
async def test_streams_on_the_redis_layer_leave_nothing_behind(redis_layer: str, alice: Any, bob: Any, carol: Any, charlie: Any) -> None:
    bind_runtime()
    session = await create_shared_session(alice)
    baseline = await warm_up(session.id, alice)
    closers = [await open_sse(session.id, bob), await open_ws(session.id, carol), await open_sse(None, bob)]
    assert session_groups(session.id)
    await eventually(lambda: {r["user"]["username"] for r in presence.summary(session.id)} == {"bob", "carol"})
    [seq] = await publish_many(session.id, 1)
    for close in closers:
        await close()
    await assert_clean(session.id, baseline, user_id=bob.pk)
    assert seq
