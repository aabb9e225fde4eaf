"""Input checked by a regular expression must match it whole: Python's ``$`` also matches
before a final newline, so ``"task.x\\n"`` once passed as an event type and carried a line
break into the ``event:`` line of every named SSE stream (issue 10, item 2)."""
from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
from channels.db import database_sync_to_async
from rest_framework.test import APIClient

from events_app.types import TypeFilter, custom_type_problem
from tests.conftest import token_for
from tests.helpers import assert_error, json_post
from tests.streamutil import SSEClient, WSClient, bind_runtime, create_shared_session, publish_many

pytestmark = pytest.mark.django_db(transaction=True)

TRAILING = ["task.x\n", "task.x\r\n", "task.x\nevent: injected", "task.x\n\ndata: {}"]
TYPE_LINE = re.compile(r"[a-z][a-z0-9_]*(\.[a-z0-9_]+)*")


@pytest.fixture
async def session(alice: Any, bob: Any, carol: Any, charlie: Any) -> AsyncIterator[Any]:
    bind_runtime()
    yield await create_shared_session(alice)


@pytest.mark.parametrize("type_name", TRAILING)
def test_custom_type_with_a_line_break_is_not_a_type(type_name: str) -> None:
    assert custom_type_problem(type_name) is not None


@pytest.mark.parametrize("type_name", TRAILING)
async def test_rest_publish_refuses_a_type_with_a_line_break(session: Any, bob: Any, type_name: str) -> None:
    def post() -> Any:
        client = APIClient()
        client.force_authenticate(bob)
        return json_post(client, f"/api/sessions/{session.id}/events/", {"type": type_name, "properties": {}})

    response = await database_sync_to_async(post)()
    body = assert_error(response, 400, "validation_error")
    assert "type" in body["details"]


@pytest.mark.parametrize("type_name", TRAILING)
async def test_websocket_publish_refuses_a_type_with_a_line_break(session: Any, bob: Any, type_name: str) -> None:
    client = WSClient(f"/ws/sessions/{session.id}/", params={"token": token_for(bob)})
    accepted, _ = await client.connect()
    assert accepted
    await client.send({"type": "publish", "id": "nl", "event": {"type": type_name, "properties": {}}})
    reply = await client.reply("nl")
    assert reply["type"] == "error" and reply["error"]["code"] == "validation_error", reply
    assert "type" in reply["error"]["details"]
    await client.disconnect()


@pytest.mark.parametrize("types", ["task\n.*", "task.x\n.*", "task.y,task.x\n.*"])
def test_types_filter_with_a_line_break_inside_a_pattern_is_refused(types: str) -> None:
    with pytest.raises(ValueError):
        TypeFilter.parse(types)


async def test_sse_types_filter_with_a_line_break_is_400(session: Any, alice: Any) -> None:
    client = SSEClient(
        f"/api/sessions/{session.id}/stream/", params={"token": token_for(alice), "types": "task\n.*"}
    )
    assert await client.open() == 400
    assert (await client.json())["error"]["code"] == "bad_request"


async def test_websocket_types_filter_with_a_line_break_is_refused_with_4400(session: Any, alice: Any) -> None:
    client = WSClient(f"/ws/sessions/{session.id}/", params={"token": token_for(alice), "types": "task\n.*"})
    accepted, code = await client.connect()
    if accepted:  # refused handshakes are accepted, then closed with 4000 + status
        code = await client.closed()
    assert code == 4400


async def test_rest_history_types_filter_with_a_line_break_is_400(session: Any, alice: Any) -> None:
    def get() -> Any:
        client = APIClient()
        client.force_authenticate(alice)
        return client.get(f"/api/sessions/{session.id}/events/", {"types": "task\n.*"})

    assert_error(await database_sync_to_async(get)(), 400, "bad_request")


def test_register_refuses_a_username_with_a_trailing_newline(db: None) -> None:
    response = json_post(APIClient(), "/api/auth/register/", {"username": "dora\n", "password": "plum-orbit-lantern-72"})
    body = assert_error(response, 400, "validation_error")
    assert "username" in body["details"]


@pytest.mark.bad_envelopes  # the stored type is one the schema (and the server now) refuses
async def test_named_sse_never_carries_a_line_break_in_an_event_line(session: Any, alice: Any, bob: Any) -> None:
    """Even an event stored with such a type (before this check existed) goes out with no
    line break inside its ``event:`` line; the rest of the stream is intact."""
    await publish_many(session.id, 1, "task.x\nevent: injected\ndata: {}")
    for type_name in TRAILING:  # refused now, over both transports
        assert custom_type_problem(type_name) is not None
    [last] = await publish_many(session.id, 1, "task.after")
    client = SSEClient(
        f"/api/sessions/{session.id}/stream/", params={"token": token_for(alice), "named": "1", "last_event_id": "0"}
    )
    await client.connected()
    frames = await client.until_seq(last)
    await client.close()
    event_lines = [line for line in client.body.decode().split("\n") if line.startswith("event:")]
    assert event_lines, client.body
    for line in event_lines:
        assert TYPE_LINE.fullmatch(line.removeprefix("event: ")), line
    assert "\r" not in client.body.decode()
    assert [f.type for f in frames][-2:] == ["task.x\nevent: injected\ndata: {}", "task.after"]
    assert frames[-1].event == "task.after"
