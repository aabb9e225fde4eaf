"""A WebSocket command is checked exactly as the REST request that does the same thing
(issue 10, item 9): blank text parts and numbers JSON cannot carry on are refused on both
transports with the same error code."""
from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from channels.db import database_sync_to_async
from rest_framework.test import APIClient

from events_app.models import Event
from sessions_app.models import Message
from tests.conftest import token_for
from tests.helpers import assert_error, raw
from tests.streamutil import WSClient, bind_runtime, create_shared_session

pytestmark = pytest.mark.django_db(transaction=True)

BLANK_TEXTS = ["   ", "\n", " \t\r\n ", "\u3000"]  # \u3000: an ideographic space
HUGE = "9" * 300


@pytest.fixture
async def session(alice: Any, bob: Any, carol: Any, charlie: Any) -> AsyncIterator[Any]:
    bind_runtime()
    yield await create_shared_session(alice)


async def rest(user: Any, method: str, path: str, body: str) -> Any:
    def call() -> Any:
        client = APIClient()
        client.force_authenticate(user)
        return raw(client, method, path, body)

    return await database_sync_to_async(call)()


async def ws_command(session_id: str, user: Any, frame: str) -> dict[str, Any]:
    client = WSClient(f"/ws/sessions/{session_id}/", params={"token": token_for(user)})
    accepted, _ = await client.connect()
    assert accepted
    await client.send_text(frame)
    reply = await client.until(lambda d: d.get("type") in ("ack", "error"))
    # The connection stays usable after a refused command.
    await client.send({"type": "ping", "id": "after"})
    assert (await client.reply("after"))["type"] == "pong"
    await client.disconnect()
    return reply[-1]


@database_sync_to_async
def stored() -> tuple[int, int]:
    return Message.objects.count(), Event.objects.count()


# ---------------------------------------------------------------- blank text


@pytest.mark.parametrize("text", BLANK_TEXTS)
async def test_rest_message_with_a_whitespace_only_text_part_is_400(session: Any, bob: Any, text: str) -> None:
    before = await stored()
    body = orjson.dumps({"parts": [{"type": "text", "text": text}]}).decode()
    response = await rest(bob, "POST", f"/api/sessions/{session.id}/messages/", body)
    error = assert_error(response, 400, "validation_error")
    assert "parts" in error["details"]
    assert await stored() == before


@pytest.mark.parametrize("text", BLANK_TEXTS)
async def test_websocket_prompt_with_a_whitespace_only_text_part_is_refused(session: Any, bob: Any, text: str) -> None:
    before = await stored()
    frame = orjson.dumps({"type": "prompt", "id": "p", "parts": [{"type": "text", "text": text}]}).decode()
    reply = await ws_command(session.id, bob, frame)
    assert reply["type"] == "error" and reply["id"] == "p", reply
    assert reply["error"]["code"] == "validation_error" and "parts" in reply["error"]["details"], reply
    assert await stored() == before


async def test_text_with_surrounding_whitespace_is_kept_exactly(session: Any, bob: Any) -> None:
    body = orjson.dumps({"parts": [{"type": "text", "text": "  indented\n"}]}).decode()
    response = await rest(bob, "POST", f"/api/sessions/{session.id}/messages/", body)
    assert response.status_code == 202, response.content
    assert response.json()["message"]["parts"][0]["text"] == "  indented\n"


# ---------------------------------------------------------------- numbers


@pytest.mark.parametrize("number", [HUGE, "-" + HUGE, str(2**64), str(-(2**63) - 1)])
async def test_an_integer_beyond_64_bits_gets_the_same_error_over_rest_and_websocket(
    session: Any, bob: Any, number: str
) -> None:
    before = await stored()
    event = f'{{"type": "task.progress", "properties": {{"n": {number}}}}}'
    response = await rest(bob, "POST", f"/api/sessions/{session.id}/events/", event)
    rest_error = assert_error(response, 400, "bad_request")
    reply = await ws_command(session.id, bob, f'{{"type": "publish", "id": 7, "event": {event}}}')
    assert reply["type"] == "error" and reply["id"] == 7, reply
    assert reply["error"]["code"] == rest_error["code"] == "bad_request", reply
    assert await stored() == before


async def test_a_huge_integer_in_a_prompt_is_refused_not_turned_into_a_float(session: Any, bob: Any) -> None:
    before = await stored()
    frame = f'{{"type": "prompt", "id": "q", "parts": [{{"type": "text", "text": "hi", "n": {HUGE}}}]}}'
    reply = await ws_command(session.id, bob, frame)
    assert reply["type"] == "error" and reply["error"]["code"] == "bad_request", reply
    assert "1e+300" not in orjson.dumps(reply).decode()
    assert await stored() == before


async def test_a_huge_command_id_is_refused_without_echoing_it(session: Any, bob: Any) -> None:
    reply = await ws_command(session.id, bob, f'{{"type": "ping", "id": {HUGE}}}')
    assert reply["type"] == "error" and reply["id"] is None and reply["error"]["code"] == "bad_request", reply


@pytest.mark.parametrize("number", [str(2**63 - 1), str(-(2**63)), str(2**64 - 1)])
async def test_integers_within_64_bits_are_published_unchanged_over_websocket(
    session: Any, bob: Any, number: str
) -> None:
    event = f'{{"type": "task.progress", "properties": {{"n": {number}}}}}'
    reply = await ws_command(session.id, bob, f'{{"type": "publish", "id": 1, "event": {event}}}')
    assert reply["type"] == "ack", reply
    assert reply["result"]["properties"]["n"] == int(number)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
async def test_non_finite_constants_are_refused_like_rest(session: Any, bob: Any, constant: str) -> None:
    event = f'{{"type": "task.progress", "properties": {{"n": {constant}}}}}'
    response = await rest(bob, "POST", f"/api/sessions/{session.id}/events/", event)
    rest_error = assert_error(response, 400, "bad_request")
    reply = await ws_command(session.id, bob, f'{{"type": "publish", "id": 2, "event": {event}}}')
    assert reply["type"] == "error" and reply["error"]["code"] == rest_error["code"], reply
