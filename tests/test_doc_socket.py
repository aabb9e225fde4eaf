"""§10 the shared document's WebSocket, through project.asgi.application: y-websocket
sync with pycrdt peers, roles, REST edits reaching open editors, awareness, and every
kind of bad frame closing with the contract's code without touching the document."""
from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest
from channels.db import database_sync_to_async
from pycrdt import Doc, Text
from redis.exceptions import ConnectionError as RedisConnectionError

from events_app import fanout, groups
from project.auth import issue_ticket
from sessions_app import doc as docs
from sessions_app import services
from tests.conftest import token_for
from tests.docpeer import (
    STEP1,
    STEP2,
    UPDATE,
    DocPeer,
    InProcessTransport,
    awareness_frame,
    awareness_update,
    sync_frame,
)
from tests.streamutil import bind_runtime, create_shared_session, eventually

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
async def session(alice: Any, bob: Any, carol: Any, charlie: Any) -> AsyncIterator[Any]:
    bind_runtime()
    yield await create_shared_session(alice)


def peer(session_id: str, user: Any | None, headers: dict[str, str] | None = None, **params: str) -> DocPeer:
    if user is not None and "ticket" not in params:
        params.setdefault("token", token_for(user))
    return DocPeer(InProcessTransport(session_id, params, headers))


async def synced(session_id: str, user: Any, **params: str) -> DocPeer:
    p = peer(session_id, user, **params)
    assert await p.open() is None
    await p.sync()
    return p


read_doc = database_sync_to_async(docs.read_doc)


async def version_is(session_id: str, version: int) -> bool:
    return (await read_doc(session_id)).version == version


async def text_is(session_id: str, text: str) -> bool:
    return (await read_doc(session_id)).text == text


# ---------------------------------------------------------------- syncing


async def test_two_editors_sync_and_every_update_is_stored(session: Any, alice: Any, bob: Any) -> None:
    a = await synced(session.id, alice)
    b = await synced(session.id, bob)
    await a.edit(0, "Hello")
    await b.until(lambda: b.value() == "Hello")
    await b.edit(5, ", world")
    await a.until(lambda: a.value() == "Hello, world")
    state = await read_doc(session.id)
    assert (state.text, state.version) == ("Hello, world", 2)
    # A third, late, gets everything in its sync.
    c = await synced(session.id, alice)
    assert c.value() == "Hello, world"
    # However many sockets, this process holds one subscription for the document.
    from events_app import fanout
    from events_app.groups import doc_group

    listeners = fanout.get_hub().groups[doc_group(session.id)]
    assert len(listeners) == 1 and len(next(iter(listeners)).conns) == 3  # type: ignore[attr-defined]
    for p in (a, b, c):
        await p.close()


async def test_a_ticket_opens_the_socket(session: Any, bob: Any) -> None:
    ticket = issue_ticket(bob.pk)
    p = await synced(session.id, None, ticket=ticket)
    assert p.value() == ""
    await p.close()


async def test_rest_edit_reaches_an_open_editor(session: Any, alice: Any, bob: Any) -> None:
    a = await synced(session.id, alice)
    await database_sync_to_async(docs.apply_edits)(bob, session.id, [docs.Edit(0, 0, "from REST")])
    await a.until(lambda: a.value() == "from REST")
    await database_sync_to_async(docs.append_paragraph)(docs.AGENT, session.id, "agent's paragraph")
    await a.until(lambda: a.value() == "from REST\n\nagent's paragraph")
    await a.close()


async def test_a_client_with_offline_edits_brings_them_in_its_sync(session: Any, alice: Any, bob: Any) -> None:
    a = await synced(session.id, alice)
    await a.edit(0, "shared ")
    await eventually(lambda: version_is(session.id, 1))
    # b already has a's text and its own offline edit; its step 2 carries only that.
    b = peer(session.id, bob)
    b.doc.apply_update(a.doc.get_update())
    b.text.insert(len(b.text), "offline")
    assert await b.open() is None
    await b.sync()
    await b.until(lambda: b.frames >= 1)
    await a.until(lambda: a.value() == "shared offline")
    assert (await read_doc(session.id)).text == "shared offline"
    await a.close()
    await b.close()


# ---------------------------------------------------------------- roles and refusals


async def test_viewer_reads_but_an_update_closes_with_4403(session: Any, alice: Any, carol: Any) -> None:
    a = await synced(session.id, alice)
    await a.edit(0, "read me")
    viewer = await synced(session.id, carol)
    await viewer.until(lambda: viewer.value() == "read me")
    await viewer.edit(0, "vandal ")
    assert await viewer.until_closed() == 4403
    assert (await read_doc(session.id)).text == "read me"
    await a.close()


async def test_viewer_step2_with_news_is_refused_and_without_is_ignored(session: Any, alice: Any, carol: Any) -> None:
    a = await synced(session.id, alice)
    await a.edit(0, "text")
    await eventually(lambda: version_is(session.id, 1))
    quiet = await synced(session.id, carol)  # its step 2 held nothing new: still open
    await a.edit(4, "!")
    await quiet.until(lambda: quiet.value() == "text!")
    sneaky = peer(session.id, carol)
    sneaky.text.insert(0, "offline edit")
    assert await sneaky.open() is None
    # It answers the server's sync step 1 with a step 2 holding its offline edit.
    assert await sneaky.until_closed() == 4403
    assert (await read_doc(session.id)).text == "text!"
    await a.close()
    await quiet.close()


@pytest.mark.parametrize("who, params, code", [
    ("charlie", {}, 4404),
    (None, {}, 4401),
    (None, {"token": "not-a-jwt"}, 4401),
    (None, {"ticket": "forged"}, 4401),
])
async def test_refusals_accept_then_close(session: Any, request: Any, who: str | None, params: dict[str, str], code: int) -> None:
    user = request.getfixturevalue(who) if who else None
    p = peer(session.id, user, **params)
    assert await p.open() is None or True
    assert await p.until_closed() == code


def _session_cookie(user: Any) -> str:
    from django.test import Client

    client = Client()
    client.force_login(user)
    return str(client.cookies["sessionid"].value)


async def test_a_browser_cookie_opens_it_from_the_servers_own_origin(session: Any, alice: Any) -> None:
    cookie = await database_sync_to_async(_session_cookie)(alice)
    headers = {"Origin": "http://localhost:8000", "Host": "localhost:8000", "Cookie": f"sessionid={cookie}"}
    p = peer(session.id, None, headers=headers)
    assert await p.open() is None
    await p.sync()
    await p.close()
    # Without an Origin (not a browser) the cookie counts for nothing.
    bare = peer(session.id, None, headers={"Cookie": f"sessionid={cookie}"})
    await bare.open()
    assert await bare.until_closed() == 4401


async def test_unknown_session_is_4404(session: Any, bob: Any) -> None:
    p = peer("ses_nope", bob)
    await p.open()
    assert await p.until_closed() == 4404


async def test_a_foreign_origin_is_refused_before_accept(session: Any, bob: Any) -> None:
    p = peer(session.id, bob, headers={"Origin": "http://evil.example"})
    assert await p.open() is not None  # closed before it was accepted (HTTP 403 on a real server)


async def test_removed_member_is_closed_with_4403(session: Any, alice: Any, bob: Any) -> None:
    b = await synced(session.id, bob)
    await database_sync_to_async(services.remove_member)(session, username="bob")
    assert await b.until_closed() == 4403


async def test_deleted_session_closes_with_4404(session: Any, alice: Any, bob: Any) -> None:
    b = await synced(session.id, bob)
    await database_sync_to_async(services.delete_session)(session)
    assert await b.until_closed() == 4404


# ---------------------------------------------------------------- bad frames


def _bad_frames() -> list[bytes | str]:
    base: Doc[Any] = Doc()
    base.get("doc", type=Text).insert(0, "some text to truncate")
    update = base.get_update()
    rng = random.Random(10)
    frames: list[bytes | str] = [
        "a text frame",
        b"",
        b"\x07",  # unknown message type
        b"\x00\x05\x00",  # unknown sync message
        b"\x00\x02",  # no payload length
        b"\x00\x02\x10abc",  # a payload shorter than its length
        b"\x00\x02\x02\x00\x00\x99",  # trailing bytes
        b"\x01\x03\x01\x01",  # awareness truncated
        awareness_frame(b"\x01\x05\x01\x03{x}"),  # awareness state not JSON
        b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # a number past 2**53
    ]
    for cut in (1, 5, 10, len(update) - 1):
        frames.append(sync_frame(UPDATE, update[:cut]))  # truncated updates
    frames.append(sync_frame(STEP2, update[:7]))
    frames.append(sync_frame(STEP1, b"\x05\x01"))  # a state vector cut short
    frames.append(sync_frame(STEP1, b"\xff\xff\xff"))
    for _ in range(6):
        frames.append(sync_frame(UPDATE, os.urandom(rng.randrange(3, 60))))
    return frames


@pytest.mark.parametrize("frame", _bad_frames(), ids=lambda f: repr(f)[:30])
async def test_bad_frames_close_with_4400_and_never_touch_the_document(session: Any, alice: Any, bob: Any, frame: Any) -> None:
    a = await synced(session.id, alice)
    await a.edit(0, "intact")
    await eventually(lambda: version_is(session.id, 1))
    b = await synced(session.id, bob)
    await b.send_raw(frame)
    assert await b.until_closed() == 4400
    state = await read_doc(session.id)
    assert (state.text, state.version) == ("intact", 1)
    # The document still takes good updates, and the other editor is unaffected.
    await a.edit(6, "!")
    await eventually(lambda: text_is(session.id, "intact!"))
    await a.close()


async def test_oversized_frame_closes_with_4009(session: Any, bob: Any, settings: Any) -> None:
    settings.TANDEM_MAX_WS_FRAME = 2048
    b = await synced(session.id, bob)
    await b.edit(0, "x" * 3000)
    assert await b.until_closed() == 4009
    assert (await read_doc(session.id)).version == 0


async def test_update_past_the_document_limit_closes_with_4009(session: Any, bob: Any, settings: Any) -> None:
    settings.TANDEM_MAX_DOC_CHARS = 10
    b = await synced(session.id, bob)
    await b.edit(0, "0123456789")
    await eventually(lambda: version_is(session.id, 1))
    await b.edit(0, "x")
    assert await b.until_closed() == 4009
    assert (await read_doc(session.id)).text == "0123456789"


@pytest.mark.parametrize("failing", ["session", "doc"])
async def test_redis_lost_while_joining_closes_with_4503(session: Any, bob: Any, monkeypatch: Any, failing: str) -> None:
    # Redis gone between the stream slot (taken from Redis: down there, prepare refuses
    # with 4503, tests/test_redis_outage.py) and joining the session's or the document's
    # group: the same 4503 "reconnect shortly", not 1011.
    target = groups.session_group(session.id) if failing == "session" else groups.doc_group(session.id)
    subscribe = fanout.Hub.subscribe

    async def unreachable(self: Any, group: str, *args: Any, **kwargs: Any) -> None:
        if group == target:
            raise RedisConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
        await subscribe(self, group, *args, **kwargs)

    monkeypatch.setattr(fanout.Hub, "subscribe", unreachable)
    p = peer(session.id, bob)
    assert await p.open() is None  # refusals accept, then close
    assert await p.until_closed() == 4503
    monkeypatch.setattr(fanout.Hub, "subscribe", subscribe)
    again = await synced(session.id, bob)
    await again.close()


# ---------------------------------------------------------------- awareness


async def test_awareness_is_relayed_to_others_and_cleared_when_they_leave(session: Any, alice: Any, bob: Any) -> None:
    a = await synced(session.id, alice)
    b = await synced(session.id, bob)
    await a.send_raw(awareness_frame(awareness_update(a.doc.client_id, 1, '{"user": {"name": "alice"}}')))
    await b.until(lambda: a.doc.client_id in b.awareness)
    assert b.awareness[a.doc.client_id] == (1, '{"user": {"name": "alice"}}')
    # A late joiner is told the states known so far.
    c = await synced(session.id, bob)
    await c.until(lambda: a.doc.client_id in c.awareness)
    await a.close()
    await b.until(lambda: a.doc.client_id not in b.awareness)
    await c.until(lambda: a.doc.client_id not in c.awareness)
    await b.close()
    await c.close()


async def test_an_editor_alone_hears_its_own_awareness_back(session: Any, alice: Any) -> None:
    # As the stock y-websocket server does: every awareness update goes to all the
    # document's connections, its sender included. A stock client closes a socket that
    # hears nothing for 30 s, and its awareness renewal every 15 s is what it hears
    # when it is alone.
    a = await synced(session.id, alice)
    await a.send_raw(awareness_frame(awareness_update(a.doc.client_id, 1, '{"user": {"name": "alice"}}')))
    await a.until(lambda: a.awareness.get(a.doc.client_id) == (1, '{"user": {"name": "alice"}}'))
    # A renewal (same state, next clock) comes back too.
    await a.send_raw(awareness_frame(awareness_update(a.doc.client_id, 2, '{"user": {"name": "alice"}}')))
    await a.until(lambda: a.awareness.get(a.doc.client_id) == (2, '{"user": {"name": "alice"}}'))
    await a.close()


# ---------------------------------------------------------------- ending


async def test_socket_opened_with_a_token_closes_when_it_expires(session: Any, bob: Any) -> None:
    from datetime import timedelta

    from rest_framework_simplejwt.tokens import AccessToken

    token = AccessToken.for_user(bob)
    token.set_exp(lifetime=timedelta(seconds=3))
    b = await synced(session.id, None, token=str(token))
    assert await b.until_closed(timeout=8) == 4401


async def test_deactivated_user_is_closed_with_4401(session: Any, bob: Any) -> None:
    b = await synced(session.id, bob)
    bob.is_active = False
    await database_sync_to_async(bob.save)()
    assert await b.until_closed() == 4401


async def test_server_stopping_closes_with_4012_and_a_late_open_too(session: Any, bob: Any) -> None:
    from events_app.streams import end_all_streams

    b = await synced(session.id, bob)
    end_all_streams()
    assert await b.until_closed() == 4012
    late = peer(session.id, bob)
    assert await late.open() is None
    assert await late.until_closed() == 4012


async def test_closing_gives_back_the_stream_slot(session: Any, bob: Any, settings: Any) -> None:
    settings.TANDEM_MAX_CONNECTIONS_PER_USER = 1
    b = await synced(session.id, bob)
    second = peer(session.id, bob)
    await second.open()
    assert await second.until_closed() == 4429
    await b.close()
    third = await eventually(lambda: _opens(session.id, bob))
    await third.close()


async def _opens(session_id: str, user: Any) -> DocPeer | None:
    p = peer(session_id, user)
    await p.open()
    try:
        await p.sync()
    except Exception:
        return None
    return p


# ---------------------------------------------------------------- doc.updated


async def test_edits_inside_the_window_are_announced_when_it_ends(session: Any, alice: Any, bob: Any, settings: Any) -> None:
    import json

    from events_app.models import Event

    settings.TANDEM_DOC_EVENT_SECONDS = 0.5

    def announced() -> list[dict[str, Any]]:
        rows = Event.objects.filter(session_id=session.id, type="doc.updated").order_by("seq")
        return [json.loads(e.envelope)["properties"] for e in rows]

    a = await synced(session.id, alice)
    await a.edit(0, "first")
    await eventually(lambda: version_is(session.id, 1))
    b = await synced(session.id, bob)
    await b.edit(5, " second")
    await b.edit(12, " third")
    await eventually(lambda: version_is(session.id, 3))
    # The first change was announced at once; the two inside its window together, by the
    # last author, once the window ended, with nobody editing meanwhile.
    found = await eventually(lambda: database_sync_to_async(lambda: len(announced()) == 2 and announced())())
    assert found == [
        {"version": 1, "by": {"id": alice.pk, "username": "alice"}},
        {"version": 3, "by": {"id": bob.pk, "username": "bob"}},
    ]
    await a.close()
    await b.close()


async def test_a_viewer_reconnecting_with_the_document_it_had_stays_open(session: Any, alice: Any, carol: Any) -> None:
    a = await synced(session.id, alice)
    await a.edit(0, "keep this, drop that")
    await a.edit(10, "", delete=10)  # a deletion: every later step 2 carries it
    await eventually(lambda: version_is(session.id, 2))
    back = peer(session.id, carol)
    back.doc.apply_update(a.doc.get_update())  # what it had before it lost its connection
    assert await back.open() is None
    await back.sync()
    await a.edit(0, ">")
    await back.until(lambda: back.value() == ">keep this,")
    assert back.closed is None
    await a.close()
    await back.close()
