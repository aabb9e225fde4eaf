"""The WebSocket stream and its commands (PROTOCOL §6), through project.asgi.application."""
from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from channels.db import database_sync_to_async

from project.auth import issue_ticket
from tests.conftest import token_for
from tests.streamutil import WSClient, bind_runtime, create_shared_session, head, publish_many

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
async def session(alice: Any, bob: Any, carol: Any, charlie: Any) -> AsyncIterator[Any]:
    bind_runtime()
    yield await create_shared_session(alice)


def ws(session_id: str | None, user: Any | None = None, *, headers: dict[str, str] | None = None, **params: str) -> WSClient:
    if user is not None:
        params.setdefault("token", token_for(user))
    path = f"/ws/sessions/{session_id}/" if session_id else "/ws/stream/"
    return WSClient(path, params=params, headers=headers)


async def opened(client: WSClient) -> dict[str, Any]:
    accepted, _ = await client.connect()
    assert accepted
    hello = await client.receive()
    assert hello["type"] == "server.connected", hello
    return hello


def _session_cookie(user: Any) -> str:
    from django.test import Client

    client = Client()
    client.force_login(user)
    return str(client.cookies["sessionid"].value)


# ---------------------------------------------------------------- handshake


async def test_token_without_origin_connects_and_streams_envelopes(session: Any, bob: Any) -> None:
    client = ws(session.id, bob)
    hello = await opened(client)
    assert hello["seq"] is None and hello["session_id"] == session.id
    assert hello["properties"]["last_seq"] == await head(session.id)
    assert hello["properties"]["resumed"] is False
    [seq] = await publish_many(session.id, 1)
    event = (await client.until_type("task.progress"))[-1]
    assert event["seq"] == seq and event["properties"]["i"] == 0
    await client.disconnect()


async def test_ticket_without_origin_connects(session: Any, carol: Any) -> None:
    client = ws(session.id, ticket=issue_ticket(carol.pk))
    await opened(client)
    await client.disconnect()


async def test_allowed_origin_with_cookie_connects(session: Any, alice: Any) -> None:
    cookie = await database_sync_to_async(_session_cookie)(alice)
    client = ws(
        session.id,
        headers={"Origin": "http://localhost:8000", "Host": "localhost:8000", "Cookie": f"sessionid={cookie}"},
    )
    await opened(client)
    await client.disconnect()


async def test_foreign_origin_is_refused_at_the_handshake(session: Any, alice: Any) -> None:
    client = ws(session.id, alice, headers={"Origin": "https://evil.example"})
    accepted, _ = await client.connect()
    assert not accepted


async def test_cookie_without_origin_is_ignored(session: Any, alice: Any) -> None:
    cookie = await database_sync_to_async(_session_cookie)(alice)
    client = ws(session.id, headers={"Cookie": f"sessionid={cookie}"})
    accepted, _ = await client.connect()
    assert accepted
    assert await client.closed() == 4401


async def test_unauthenticated_is_accepted_then_closed_4401(session: Any) -> None:
    for client in (ws(session.id), ws(session.id, token="forged"), ws(session.id, ticket="1:x:y")):
        accepted, _ = await client.connect()
        assert accepted
        assert await client.closed() == 4401


async def test_outsider_is_closed_4404(session: Any, charlie: Any) -> None:
    client = ws(session.id, charlie)
    accepted, _ = await client.connect()
    assert accepted
    assert await client.closed() == 4404


@pytest.mark.parametrize("bad", ["abc", "-1", "+1", "1e3", " 1"])
async def test_malformed_last_event_id_is_closed_4400(session: Any, alice: Any, bad: str) -> None:
    client = ws(session.id, alice, last_event_id=bad)
    accepted, _ = await client.connect()
    assert accepted
    assert await client.closed() == 4400


async def test_last_event_id_resumes_over_websocket(session: Any, alice: Any) -> None:
    seqs = await publish_many(session.id, 4)
    client = ws(session.id, alice, last_event_id=str(seqs[0]))
    hello = await opened(client)
    assert hello["properties"]["resumed"] is True
    events = await client.until(lambda d: d.get("seq") == seqs[-1])
    assert [e["seq"] for e in events if e.get("seq")] == seqs[1:]
    await client.disconnect()


# ---------------------------------------------------------------- commands


async def test_ping_gets_pong_with_the_same_id(session: Any, carol: Any) -> None:
    client = ws(session.id, carol)
    await opened(client)
    await client.send({"type": "ping", "id": "p-1"})
    assert await client.reply("p-1") == {"type": "pong", "id": "p-1"}
    await client.send({"type": "ping", "id": 7})
    assert await client.reply(7) == {"type": "pong", "id": 7}
    await client.disconnect()


async def test_editor_prompt_is_acked_and_the_reply_streams(session: Any, bob: Any) -> None:
    client = ws(session.id, bob)
    await opened(client)
    await client.send({"type": "prompt", "id": "q", "parts": [{"type": "text", "text": "hi there"}]})
    ack = await client.reply("q")
    assert ack["type"] == "ack"
    assert ack["result"]["message"]["parts"][0]["text"] == "hi there"
    reply_id = ack["result"]["reply_id"]
    await client.seen(
        lambda d: d.get("type") == "message.completed" and d["properties"]["message_id"] == reply_id
    )
    deltas = "".join(
        e["properties"].get("delta", "") for e in client.received
        if e.get("type") == "message.part.updated" and e["properties"]["message_id"] == reply_id
    )
    assert deltas == "hi there"
    await client.seen(lambda d: d.get("type") == "session.status" and d["properties"]["status"]["type"] == "idle")
    await client.disconnect()


async def test_viewer_write_commands_get_permission_denied(session: Any, carol: Any) -> None:
    client = ws(session.id, carol)
    await opened(client)
    commands = [
        {"type": "prompt", "id": "a", "parts": [{"type": "text", "text": "x"}]},
        {"type": "abort", "id": "b"},
        {"type": "publish", "id": "c", "event": {"type": "task.progress", "properties": {}}},
        {"type": "permission.reply", "id": "d", "permission_id": "x", "approved": True},
    ]
    for command in commands:
        await client.send(command)
        reply = await client.reply(command["id"])
        assert reply["type"] == "error", reply
        assert reply["error"]["code"] == "permission_denied", reply
    await client.send({"type": "ping", "id": "still-open"})
    assert (await client.reply("still-open"))["type"] == "pong"
    await client.disconnect()


async def test_abort_is_acked(session: Any, bob: Any) -> None:
    client = ws(session.id, bob)
    await opened(client)
    await client.send({"type": "abort", "id": "x"})
    assert await client.reply("x") == {"type": "ack", "id": "x", "result": {"aborted": False}}
    await client.disconnect()


async def test_abort_stops_a_running_reply(session: Any, bob: Any, settings: Any) -> None:
    settings.TANDEM_ECHO_DELAY_MS = 200
    client = ws(session.id, bob)
    await opened(client)
    text = " ".join(f"word{i}" for i in range(50))
    await client.send({"type": "prompt", "id": "p", "parts": [{"type": "text", "text": text}]})
    reply_id = (await client.reply("p"))["result"]["reply_id"]
    await client.seen(lambda d: d.get("type") == "message.part.updated" and "delta" in d["properties"])
    await client.send({"type": "abort", "id": "a"})
    assert (await client.reply("a"))["result"] == {"aborted": True}
    done = await client.seen(
        lambda d: d.get("type") == "message.completed" and d["properties"]["message_id"] == reply_id
    )
    assert done["properties"]["status"] == "cancelled"
    await client.disconnect()


async def test_publish_is_acked_with_the_event_and_streamed(session: Any, bob: Any) -> None:
    client = ws(session.id, bob)
    await opened(client)
    await client.send({"type": "publish", "id": 1, "event": {"type": "task.progress", "properties": {"pct": 50}}})
    ack = await client.reply(1)
    assert ack["type"] == "ack"
    event = ack["result"]
    assert event["type"] == "task.progress" and event["seq"] == await head(session.id)
    assert event["properties"] == {"pct": 50, "published_by": {"id": bob.pk, "username": "bob"}}
    streamed = await client.seen(lambda d: d.get("seq") == event["seq"])
    assert streamed == event
    await client.disconnect()


@pytest.mark.parametrize(
    "event",
    [
        {"type": "message.created", "properties": {}},
        {"type": "Bad", "properties": {}},
        {"type": "task.progress", "properties": []},
        {"type": "task.progress", "properties": {}, "extra": 1},
        "task.progress",
    ],
)
async def test_publish_with_bad_fields_gets_an_error_and_stays_open(session: Any, bob: Any, event: Any) -> None:
    client = ws(session.id, bob)
    await opened(client)
    await client.send({"type": "publish", "id": "e", "event": event})
    reply = await client.reply("e")
    assert reply["type"] == "error" and reply["error"]["code"] == "validation_error", reply
    await client.send({"type": "ping", "id": "ok"})
    assert (await client.reply("ok"))["type"] == "pong"
    await client.disconnect()


async def test_presence_update_is_broadcast_to_other_connections(session: Any, bob: Any, carol: Any) -> None:
    watcher = ws(session.id, carol)
    await opened(watcher)
    client = ws(session.id, bob)
    hello = await opened(client)
    state = {"cursor": {"line": 3}, "typing": True}
    await client.send({"type": "presence.update", "id": "s", "state": state})
    assert await client.reply("s") == {"type": "ack", "id": "s", "result": {"state": state}}
    updated = (await watcher.until_type("presence.updated"))[-1]
    assert updated["seq"] is None
    assert updated["properties"] == {
        "user": {"id": bob.pk, "username": "bob"},
        "connection_id": hello["properties"]["connection_id"],
        "transport": "ws",
        "state": state,
    }
    for c in (client, watcher):
        await c.disconnect()


async def test_presence_state_over_4_kib_is_refused(session: Any, bob: Any) -> None:
    client = ws(session.id, bob)
    await opened(client)
    await client.send({"type": "presence.update", "id": "big", "state": {"x": "y" * 5000}})
    reply = await client.reply("big")
    assert reply["type"] == "error" and reply["error"]["code"] == "validation_error"
    await client.send({"type": "presence.update", "id": "list", "state": [1]})
    assert (await client.reply("list"))["type"] == "error"
    await client.send({"type": "ping", "id": "ok"})
    assert (await client.reply("ok"))["type"] == "pong"
    await client.disconnect()


@pytest.mark.parametrize(
    "frame",
    ["{not json", "[1, 2]", '"ping"', "null", '{"type": "dance", "id": "u"}', '{"id": "u"}'],
)
async def test_bad_frames_get_an_error_reply_and_the_connection_stays_open(
    session: Any, carol: Any, frame: str
) -> None:
    client = ws(session.id, carol)
    await opened(client)
    await client.send_text(frame)
    reply = await client.until_type("error")
    assert reply[-1]["error"]["code"] == "bad_request"
    assert set(reply[-1]["error"]) >= {"code", "message"}
    await client.send({"type": "ping", "id": "alive"})
    assert (await client.reply("alive"))["type"] == "pong"
    await client.disconnect()


async def test_binary_frame_gets_an_error_reply_and_the_connection_stays_open(session: Any, carol: Any) -> None:
    client = ws(session.id, carol)
    await opened(client)
    await client.send_bytes(b'{"type": "ping", "id": "b"}')
    reply = (await client.until_type("error"))[-1]
    assert reply["error"]["code"] == "bad_request"
    await client.send({"type": "ping", "id": "alive"})
    assert (await client.reply("alive"))["type"] == "pong"
    await client.disconnect()


async def test_frame_over_the_limit_closes_with_4009(session: Any, carol: Any, settings: Any) -> None:
    settings.TANDEM_MAX_WS_FRAME = 2048
    client = ws(session.id, carol)
    await opened(client)
    await client.send({"type": "ping", "id": "x" * 4096})
    assert await client.closed() == 4009
    assert not any(d.get("type") == "pong" for d in client.received)


async def test_user_level_socket_commands_name_their_session(session: Any, bob: Any) -> None:
    client = ws(None, bob)
    hello = await opened(client)
    assert hello["session_id"] is None and "cursor" in hello["properties"]
    await client.send({"type": "publish", "id": "no-session", "event": {"type": "task.progress", "properties": {}}})
    assert (await client.reply("no-session"))["error"]["code"] == "validation_error"
    await client.send(
        {"type": "publish", "id": "ok", "session_id": session.id, "event": {"type": "task.progress", "properties": {}}}
    )
    ack = await client.reply("ok")
    assert ack["type"] == "ack"
    streamed = await client.seen(lambda d: d.get("seq") == ack["result"]["seq"])
    assert streamed["session_id"] == session.id and isinstance(streamed["cursor"], str)
    await client.disconnect()


async def test_removed_member_socket_closes_4403(session: Any, alice: Any, bob: Any) -> None:
    from sessions_app import services

    client = ws(session.id, bob)
    await opened(client)
    await database_sync_to_async(services.remove_member)(session, username="bob")
    assert await client.closed(timeout=1.0) == 4403


# ---------------------------------------------------------------- permissions over WebSocket


async def test_permission_request_streams_and_a_ws_reply_resolves_it(session: Any, alice: Any, bob: Any) -> None:
    from sessions_app.models import Session

    await database_sync_to_async(Session.objects.filter(pk=session.id).update)(agent="tools")
    watcher, answerer = ws(session.id, alice), ws(session.id, bob)
    await opened(watcher)
    await opened(answerer)
    await answerer.send({"type": "prompt", "id": "p", "parts": [{"type": "text", "text": "!calc 6*7"}]})
    reply_id = (await answerer.reply("p"))["result"]["reply_id"]
    requested = await watcher.seen(lambda d: d.get("type") == "permission.requested")
    permission = requested["properties"]["permission"]
    await answerer.seen(lambda d: d.get("type") == "permission.requested")

    bad = [
        ({"type": "permission.reply", "id": "b1", "permission_id": permission["id"], "approved": "yes"}, "validation_error"),
        ({"type": "permission.reply", "id": "b2", "permission_id": permission["id"]}, "validation_error"),
        ({"type": "permission.reply", "id": "b3", "permission_id": 7, "approved": True}, "validation_error"),
        ({"type": "permission.reply", "id": "b4", "permission_id": "per_nope", "approved": True}, "not_found"),
        ({"type": "permission.reply", "id": "b5", "permission_id": permission["id"], "approved": True, "x": 1}, "validation_error"),
    ]
    for command, code in bad:
        await answerer.send(command)
        reply = await answerer.reply(command["id"])
        assert reply["type"] == "error" and reply["error"]["code"] == code, reply

    await answerer.send({"type": "permission.reply", "id": "ok", "permission_id": permission["id"], "approved": True, "reason": "fine"})
    ack = await answerer.reply("ok")
    assert ack["type"] == "ack" and ack["result"]["status"] == "approved" and ack["result"]["reason"] == "fine"
    await answerer.send({"type": "permission.reply", "id": "again", "permission_id": permission["id"], "approved": False})
    assert (await answerer.reply("again"))["error"]["code"] == "already_resolved"

    resolved = await watcher.seen(lambda d: d.get("type") == "permission.resolved")
    assert resolved["properties"]["resolved_by"] == {"id": bob.pk, "username": "bob"}
    done = await watcher.seen(
        lambda d: d.get("type") == "message.completed" and d["properties"]["message_id"] == reply_id
    )
    assert done["properties"]["status"] == "completed"
    tool_done = [e for e in watcher.received if e.get("type") == "tool.status"][-1]
    assert tool_done["properties"]["status"] == "completed" and tool_done["properties"]["output"] == 42
    await watcher.disconnect()
    await answerer.disconnect()


async def test_prompt_if_busy_queues_rejects_interrupts_and_refuses_other_values(
    session: Any, bob: Any, alice: Any, settings: Any
) -> None:
    settings.TANDEM_ECHO_DELAY_MS = 50
    client = ws(session.id, bob)
    await opened(client)
    long = " ".join(f"w{i}" for i in range(200))
    await client.send({"type": "prompt", "id": "p", "parts": [{"type": "text", "text": long}]})
    first = (await client.reply("p"))["result"]["reply_id"]
    await client.send({"type": "prompt", "id": "q", "parts": [{"type": "text", "text": "queued"}]})
    queued = (await client.reply("q"))["result"]
    assert (queued["reply_id"], queued["queued"], queued["position"]) == (None, True, 1)
    assert queued["message"]["status"] == "queued"
    await client.send({"type": "prompt", "id": "r", "if_busy": "reject", "parts": [{"type": "text", "text": "x"}]})
    rejected = await client.reply("r")
    assert rejected["type"] == "error" and rejected["error"]["code"] == "session_busy"
    await client.send({"type": "prompt", "id": "b", "if_busy": "soon", "parts": [{"type": "text", "text": "x"}]})
    bad = await client.reply("b")
    assert bad["type"] == "error" and bad["error"]["code"] == "validation_error"
    await client.send({"type": "prompt", "id": "i", "if_busy": "interrupt", "parts": [{"type": "text", "text": "now"}]})
    interrupted = (await client.reply("i"))["result"]
    assert interrupted["position"] == 1
    done = await client.seen(
        lambda d: d.get("type") == "message.completed" and d["properties"]["message_id"] == first
    )
    assert done["properties"]["status"] == "cancelled"
    turns = []
    for _ in range(2):
        updated = await client.seen(
            lambda d: d.get("type") == "message.updated" and d["properties"]["message_id"] not in turns
        )
        turns.append(updated["properties"]["message_id"])
    assert turns == [interrupted["message"]["id"], queued["message"]["id"]]
    await client.seen(lambda d: d.get("type") == "session.status" and d["properties"]["status"]["type"] == "idle")
    await client.disconnect()
