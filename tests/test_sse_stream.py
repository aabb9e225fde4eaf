"""The SSE stream (PROTOCOL §4, §5), driven through project.asgi.application."""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any
from unittest import mock

import pytest
from channels.db import database_sync_to_async
from rest_framework_simplejwt.tokens import AccessToken

from project.auth import issue_ticket
from tests.conftest import client_for, token_for
from tests.streamutil import (
    SSEClient,
    bind_runtime,
    create_shared_session,
    head,
    publish_many,
    stream_path,
)

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
async def session(alice: Any, bob: Any, carol: Any, charlie: Any) -> AsyncIterator[Any]:
    bind_runtime()
    yield await create_shared_session(alice)


def sse(session_id: str | None, user: Any | None = None, **params: str) -> SSEClient:
    headers: dict[str, str] = {}
    if "last_event_id_header" in params:
        headers["Last-Event-ID"] = params.pop("last_event_id_header")
    if user is not None:
        params.setdefault("token", token_for(user))
    return SSEClient(stream_path(session_id), params=params, headers=headers)


# ---------------------------------------------------------------- the response


async def test_stream_opens_with_sse_headers_retry_and_server_connected(session: Any, alice: Any) -> None:
    client = sse(session.id, alice)
    assert await client.open() == 200
    assert client.headers["content-type"].startswith("text/event-stream")
    assert client.headers["cache-control"] == "no-cache"
    assert client.headers["x-accel-buffering"] == "no"
    # retry: rides in server.connected's block: no block without data, which some
    # clients (httpx-sse) would hand over as an event with empty data.
    hello = await client.next_frame()
    assert hello.type == "server.connected" and hello.retry == 3000
    assert hello.id is None and hello.event is None
    assert hello.data is not None and hello.data["seq"] is None
    assert hello.data["session_id"] == session.id
    props = hello.data["properties"]
    assert set(props) == {"connection_id", "last_seq", "resumed"}
    assert props["last_seq"] == await head(session.id) and props["resumed"] is False
    assert isinstance(props["connection_id"], str) and props["connection_id"]
    await client.close()


async def test_persisted_events_carry_their_seq_as_id(session: Any, alice: Any) -> None:
    client = sse(session.id, alice)
    hello = await client.connected()
    [seq] = await publish_many(session.id, 1)
    event = (await client.until_type("task.progress"))[-1]
    assert event.id == str(seq) and event.seq == seq == hello.data["properties"]["last_seq"] + 1  # type: ignore[index]
    assert event.event is None
    assert event.data["properties"]["i"] == 0  # type: ignore[index]
    await client.close()


async def test_named_frames_add_an_event_line(session: Any, alice: Any) -> None:
    client = sse(session.id, alice, named="1")
    hello = await client.connected()
    assert hello.event == "server.connected" and hello.id is None
    await publish_many(session.id, 1)
    event = (await client.until_type("task.progress"))[-1]
    assert event.event == "task.progress" and event.id == str(event.seq)
    await client.close()


async def test_types_filter_passes_matching_and_control_events_only(session: Any, alice: Any) -> None:
    client = sse(session.id, alice, types="message.*,session.status")
    await client.connected()
    await publish_many(session.id, 2)  # task.progress: filtered out
    await database_sync_to_async(_post_hello)(session, alice)
    events = await client.until(
        lambda f: f.type == "session.status" and f.data["properties"]["status"]["type"] == "idle"  # type: ignore[index]
    )
    types = {e.type for e in events}
    assert "task.progress" not in types
    assert "message.created" in types and "message.part.updated" in types
    assert types <= {"message.created", "message.part.updated", "message.completed", "session.status"}
    await client.close()


def _post_hello(session: Any, user: Any) -> None:
    from sessions_app import services

    services.post_message(session.id, user, [{"type": "text", "text": "hello there"}])


async def test_types_filter_always_passes_server_and_stream_events(session: Any, alice: Any, settings: Any) -> None:
    settings.TANDEM_HEARTBEAT_SECONDS = 0.2
    client = sse(session.id, alice, types="task.progress", last_event_id="99999")
    await client.connected()
    reset = await client.next_event()
    assert reset.type == "stream.reset"
    assert (await client.next_event()).type == "server.heartbeat"
    await client.close()


@pytest.mark.parametrize("types", ["", "Message.*", "message.", "*", "a..b", "message.*,"])
async def test_bad_types_filter_is_a_json_400(session: Any, alice: Any, types: str) -> None:
    client = sse(session.id, alice, types=types)
    assert await client.open() == 400
    assert client.headers["content-type"] == "application/json"
    assert (await client.json())["error"]["code"] == "bad_request"


# ---------------------------------------------------------------- errors before streaming


async def test_no_credentials_is_401_json(session: Any) -> None:
    client = sse(session.id)
    assert await client.open() == 401
    assert (await client.json())["error"]["code"] == "not_authenticated"


async def test_outsider_gets_404_json(session: Any, charlie: Any) -> None:
    client = sse(session.id, charlie)
    assert await client.open() == 404
    assert (await client.json())["error"]["code"] == "not_found"


async def test_unknown_session_gets_404_json(session: Any, alice: Any) -> None:
    client = sse("nosuchsession", alice)
    assert await client.open() == 404
    assert (await client.json())["error"]["code"] == "not_found"


@pytest.mark.parametrize("bad", ["abc", "-1", "1.5", "١٢"])
async def test_malformed_last_event_id_is_400_json(session: Any, alice: Any, bad: str) -> None:
    for client in (sse(session.id, alice, last_event_id_header=bad), sse(session.id, alice, last_event_id=bad)):
        assert await client.open() == 400
        assert (await client.json())["error"]["code"] == "bad_request"


async def test_post_to_a_stream_is_refused_with_json(session: Any, alice: Any) -> None:
    client = SSEClient(stream_path(session.id), params={"token": token_for(alice)}, method="POST")
    assert await client.open() == 405
    assert "error" in await client.json()


# ---------------------------------------------------------------- authentication


async def test_bearer_header_authenticates(session: Any, bob: Any) -> None:
    client = SSEClient(stream_path(session.id), headers={"Authorization": f"Bearer {token_for(bob)}"})
    await client.connected()
    await client.close()


@pytest.mark.parametrize("header", ["Basic Ym9iOnB3", "Token abc", "Bearer", "Bearer not-a-jwt"])
async def test_bad_authorization_header_is_401(session: Any, header: str) -> None:
    client = SSEClient(stream_path(session.id), headers={"Authorization": header})
    assert await client.open() == 401
    assert (await client.json())["error"]["code"] == "authentication_failed"


async def test_ticket_from_the_ticket_endpoint_authenticates(session: Any, carol: Any) -> None:
    response = await database_sync_to_async(client_for(carol).post)("/api/auth/ticket/")
    assert response.status_code == 200
    body = response.json()
    assert body["expires_in"] == 60
    client = SSEClient(stream_path(session.id), params={"ticket": body["ticket"]})
    await client.connected()
    await client.close()


async def test_expired_or_forged_ticket_is_401(session: Any, alice: Any) -> None:
    with mock.patch("django.core.signing.time.time", return_value=time.time() - 120):
        expired = issue_ticket(alice.pk)
    good = issue_ticket(alice.pk)
    user_id, stamp, signature = good.split(":")
    for ticket in (expired, f"{user_id}:{stamp}:{signature[::-1]}", f"{user_id + '0'}:{stamp}:{signature}", "x"):
        client = SSEClient(stream_path(session.id), params={"ticket": ticket})
        assert await client.open() == 401, ticket
        assert (await client.json())["error"]["code"] == "authentication_failed"


async def test_expired_access_token_is_401(session: Any, alice: Any) -> None:
    token = AccessToken.for_user(alice)
    token.set_exp(lifetime=timedelta(seconds=-5))
    client = SSEClient(stream_path(session.id), params={"token": str(token)})
    assert await client.open() == 401


# ---------------------------------------------------------------- resume


async def test_last_event_id_replays_everything_after_it(session: Any, alice: Any) -> None:
    seqs = await publish_many(session.id, 5)
    client = sse(session.id, alice, last_event_id_header=str(seqs[1]))
    hello = await client.connected()
    assert hello.data["properties"]["resumed"] is True  # type: ignore[index]
    events = await client.until_seq(seqs[-1])
    assert [e.seq for e in events] == seqs[2:]
    assert [e.id for e in events] == [str(s) for s in seqs[2:]]
    await client.close()


async def test_last_event_id_header_wins_over_the_query_parameter(session: Any, alice: Any) -> None:
    seqs = await publish_many(session.id, 4)
    client = sse(session.id, alice, last_event_id_header=str(seqs[2]), last_event_id=str(seqs[0]))
    await client.connected()
    events = await client.until_seq(seqs[-1])
    assert [e.seq for e in events] == seqs[3:]
    await client.close()


async def test_last_event_id_query_parameter_resumes(session: Any, alice: Any) -> None:
    seqs = await publish_many(session.id, 3)
    client = sse(session.id, alice, last_event_id=str(seqs[0]))
    await client.connected()
    assert [e.seq for e in await client.until_seq(seqs[-1])] == seqs[1:]
    await client.close()


async def test_last_event_id_zero_replays_from_the_start(session: Any, alice: Any) -> None:
    await publish_many(session.id, 2)
    last = await head(session.id)
    client = sse(session.id, alice, last_event_id_header="0")
    hello = await client.connected()
    assert hello.data["properties"]["resumed"] is True  # type: ignore[index]
    events = await client.until_seq(last)
    assert [e.seq for e in events] == list(range(1, last + 1))
    assert events[0].type == "session.created"
    await client.close()


async def test_replay_meets_live_events_without_gap_or_duplicate(session: Any, alice: Any, settings: Any) -> None:
    # Replay reads in batches; a small batch makes live events land mid-replay.
    from events_app import streams

    before = await publish_many(session.id, 300)
    resume_at = before[100]
    with mock.patch.object(streams, "REPLAY_BATCH", 7):
        client = sse(session.id, alice, last_event_id_header=str(resume_at))
        await client.open()
        publish = publish_many(session.id, 60)
        await client.next_event()  # server.connected
        after = await publish
        events = await client.until_seq(after[-1], timeout=15)
    seqs = [e.seq for e in events if e.seq is not None]
    assert seqs == list(range(resume_at + 1, after[-1] + 1))
    await client.close()


async def test_live_events_published_during_replay_arrive_exactly_once(session: Any, alice: Any) -> None:
    # One event per database call: the writer's commits interleave with the stream's own
    # queries (join, head read, each replay batch), so some land in every window.
    from events_app import streams

    async def writer() -> None:
        for _ in range(60):
            await publish_many(session.id, 1)

    await publish_many(session.id, 20)
    with mock.patch.object(streams, "REPLAY_BATCH", 3):
        clients = [sse(session.id, alice, last_event_id_header=str(n)) for n in (0, 10)]
        task = asyncio.ensure_future(writer())
        for client in clients:
            await client.open()
        await task
        last = await head(session.id)
        for client, start in zip(clients, (0, 10), strict=True):
            events = await client.until_seq(last, timeout=15)
            seqs = [e.seq for e in events if e.seq is not None]
            assert seqs == list(range(start + 1, last + 1))
            await client.close()


async def test_future_last_event_id_sends_reset_unknown_position(session: Any, alice: Any) -> None:
    last = await head(session.id)
    client = sse(session.id, alice, last_event_id_header=str(last + 50))
    hello = await client.connected()
    assert hello.data["properties"]["resumed"] is False  # type: ignore[index]
    reset = await client.next_event()
    assert reset.type == "stream.reset" and reset.id is None and reset.seq is None
    assert reset.data["properties"] == {"reason": "unknown_position", "last_seq": last}  # type: ignore[index]
    [seq] = await publish_many(session.id, 1)
    assert [e.seq for e in await client.until_seq(seq) if e.seq] == [seq]  # live events follow
    await client.close()


async def test_pruned_history_sends_reset_history_expired(session: Any, alice: Any, settings: Any) -> None:
    settings.TANDEM_EVENT_RETENTION_COUNT = 5
    seqs = await publish_many(session.id, 20)
    client = sse(session.id, alice, last_event_id_header=str(seqs[2]))
    hello = await client.connected()
    assert hello.data["properties"]["resumed"] is False  # type: ignore[index]
    reset = await client.next_event()
    assert reset.type == "stream.reset"
    assert reset.data["properties"] == {"reason": "history_expired", "last_seq": seqs[-1]}  # type: ignore[index]
    [seq] = await publish_many(session.id, 1)
    assert [e.seq for e in await client.until_seq(seq) if e.seq] == [seq]
    await client.close()


async def test_resume_at_the_head_is_resumed_with_nothing_to_replay(session: Any, alice: Any) -> None:
    last = await head(session.id)
    client = sse(session.id, alice, last_event_id_header=str(last))
    hello = await client.connected()
    assert hello.data["properties"] == {**hello.data["properties"], "resumed": True, "last_seq": last}  # type: ignore[index]
    [seq] = await publish_many(session.id, 1)
    assert [e.seq for e in await client.until_seq(seq) if e.seq] == [seq] == [last + 1]
    await client.close()


# ---------------------------------------------------------------- heartbeat and auth expiry


async def test_silent_stream_gets_heartbeats_without_id(session: Any, alice: Any, settings: Any) -> None:
    settings.TANDEM_HEARTBEAT_SECONDS = 0.2
    client = sse(session.id, alice)
    await client.connected()
    beat = (await client.until_type("server.heartbeat", timeout=3))[-1]
    assert beat.type == "server.heartbeat" and beat.id is None
    assert beat.data == {**beat.data, "seq": None, "properties": {}}  # type: ignore[dict-item]
    await client.close()


async def test_token_stream_ends_with_auth_expired_but_ticket_and_cookie_streams_continue(
    session: Any, alice: Any
) -> None:
    token = AccessToken.for_user(alice)
    token.set_exp(lifetime=timedelta(seconds=1.2))
    by_token = SSEClient(stream_path(session.id), params={"token": str(token)})
    by_ticket = SSEClient(stream_path(session.id), params={"ticket": issue_ticket(alice.pk)})
    cookie = await database_sync_to_async(_session_cookie)(alice)
    by_cookie = SSEClient(stream_path(session.id), headers={"Cookie": f"sessionid={cookie}"})
    for client in (by_token, by_ticket, by_cookie):
        await client.connected()
    tail = await by_token.ends(timeout=6)
    assert tail and tail[-1].type == "auth.expired"
    assert tail[-1].id is None and tail[-1].seq is None and tail[-1].data["properties"] == {}  # type: ignore[index]
    assert by_token.buffer == ""
    [seq] = await publish_many(session.id, 1)
    for client in (by_ticket, by_cookie):
        events = await client.until_seq(seq)
        assert "auth.expired" not in [e.type for e in events]
        await client.close()


def _session_cookie(user: Any) -> str:
    from django.test import Client

    client = Client()
    client.force_login(user)
    return str(client.cookies["sessionid"].value)


# ---------------------------------------------------------------- slow clients


async def test_overflowing_connection_queue_stays_bounded(session: Any, alice: Any, settings: Any) -> None:
    from events_app.streams import Connection, prepare
    from events_app.types import Frame

    settings.TANDEM_STREAM_QUEUE = 10
    scope = {"type": "http", "query_string": f"token={token_for(alice)}".encode(), "headers": []}
    request = await prepare(scope, session.id, "sse")

    async def never_called(chunks: list[Any]) -> None:
        raise AssertionError("nothing is written")

    conn = Connection(request, never_called)
    for seq in range(1, 1001):
        conn.deliver(Frame(seq, session.id, "task.progress", "{}"))
    assert conn.overflowed
    assert len(conn.queue) <= settings.TANDEM_STREAM_QUEUE + 1
    assert await conn.run() == "slow_client"


async def test_slow_client_is_disconnected_and_resumes_without_loss(session: Any, alice: Any, settings: Any) -> None:
    settings.TANDEM_STREAM_QUEUE = 5
    client = SSEClient(stream_path(session.id), params={"token": token_for(alice)}, buffer=1)
    await client.connected()
    seqs = await publish_many(session.id, 200)  # the client reads nothing meanwhile
    # Whether the server's last write got through before it gave up depends on timing.
    tail = await client.ends(dropped_ok=True)
    got = [e.seq for e in tail if e.seq is not None]
    assert not got or got[-1] < seqs[-1]  # it was cut off before the end
    last_id = next((f.id for f in reversed(client.frames) if f.id is not None), None)
    assert last_id is None or int(last_id) == got[-1]
    resume_from = int(last_id) if last_id is not None else seqs[0] - 1
    again = sse(session.id, alice, last_event_id_header=str(resume_from))
    hello = await again.connected()
    assert hello.data["properties"]["resumed"] is True  # type: ignore[index]
    events = await again.until_seq(seqs[-1])
    assert [e.seq for e in events if e.seq is not None] == list(range(resume_from + 1, seqs[-1] + 1))
    await again.close()


# ---------------------------------------------------------------- membership


async def test_removed_member_stream_closes_within_a_second(session: Any, bob: Any) -> None:
    from sessions_app import services

    client = sse(session.id, bob)
    await client.connected()
    await database_sync_to_async(services.remove_member)(session, username="bob")
    await client.ends(timeout=1.0)
    again = sse(session.id, bob)
    assert await again.open() == 404


async def test_deleted_session_sends_session_deleted_then_ends(session: Any, alice: Any, bob: Any) -> None:
    from sessions_app import services

    clients = [sse(session.id, alice), sse(session.id, bob)]
    for client in clients:
        await client.connected()
    await database_sync_to_async(services.delete_session)(session)
    for client in clients:
        tail = await client.ends(timeout=2.0)
        assert tail and tail[-1].type == "session.deleted"
        assert tail[-1].id is None and tail[-1].data["properties"] == {"session_id": session.id}  # type: ignore[index]


async def test_user_stream_carries_cursors_and_follows_new_sessions(
    session: Any, alice: Any, bob: Any, charlie: Any
) -> None:
    from sessions_app import services

    other = await database_sync_to_async(services.create_session)(alice, title="Second", agent="echo")
    client = sse(None, charlie)
    hello = await client.connected()
    assert hello.data["session_id"] is None and hello.data["properties"]["resumed"] is False  # type: ignore[index]
    start_cursor = hello.data["properties"]["cursor"]  # type: ignore[index]
    await database_sync_to_async(services.add_member)(session, username="charlie", role="viewer")
    added = (await client.until_type("member.added"))[-1]
    assert added.data["session_id"] == session.id  # type: ignore[index]
    assert added.data["properties"]["user"]["username"] == "charlie"  # type: ignore[index]
    assert added.id == added.data["cursor"]  # type: ignore[index]
    [seq] = await publish_many(session.id, 1)
    event = (await client.until_seq(seq))[-1]
    assert event.data["cursor"] == event.id and event.id != added.id  # type: ignore[index]
    await publish_many(other.id, 1)  # not charlie's: never delivered
    await database_sync_to_async(services.add_member)(other, username="charlie", role="editor")
    joined = (await client.until(lambda f: f.type == "member.added" and f.data["session_id"] == other.id))  # type: ignore[index]
    assert all(f.data["session_id"] != other.id or f.type == "member.added" for f in joined)  # type: ignore[index]
    await client.close()

    # Resuming from the first cursor replays both sessions from where charlie joined.
    again = sse(None, charlie, last_event_id_header=start_cursor)
    hello = await again.connected()
    assert hello.data["properties"]["resumed"] is True  # type: ignore[index]
    target = {session.id: await head(session.id), other.id: await head(other.id)}
    reached: set[str] = set()

    def done(f: Any) -> bool:
        if f.seq is not None and f.seq == target.get(f.data["session_id"]):
            reached.add(f.data["session_id"])
        return reached == set(target)

    events = await again.until(done)
    replayed = [(e.data["session_id"], e.seq) for e in events if e.seq is not None]  # type: ignore[index]
    for sid in (session.id, other.id):
        mine = [s for s_id, s in replayed if s_id == sid]
        # A session joined after the cursor is followed from its start.
        assert mine == list(range(1, target[sid] + 1))
        assert all(e.data["cursor"] == e.id for e in events if e.seq is not None)  # type: ignore[index]
    await again.close()


async def test_user_stream_resumes_from_a_cursor_without_loss(session: Any, bob: Any) -> None:
    client = sse(None, bob)
    await client.connected()
    first = await publish_many(session.id, 3)
    events = await client.until_seq(first[-1])
    cursor = events[-1].id
    assert cursor is not None and events[-1].data["cursor"] == cursor  # type: ignore[index]
    await client.close()
    missed = await publish_many(session.id, 4)
    again = sse(None, bob, last_event_id_header=cursor)
    hello = await again.connected()
    assert hello.data["properties"]["resumed"] is True  # type: ignore[index]
    replayed = await again.until_seq(missed[-1])
    assert [e.seq for e in replayed if e.seq is not None] == missed
    await again.close()


async def test_bad_user_stream_cursor_is_400(session: Any, bob: Any) -> None:
    client = sse(None, bob, last_event_id_header="not-a-cursor")
    assert await client.open() == 400
    assert (await client.json())["error"]["code"] == "bad_request"


@pytest.mark.parametrize(
    ("origin", "status"),
    [
        (None, 200),  # same-origin EventSource: browsers send no Origin on a GET
        ("http://testserver", 200),  # the site's own origin
        ("https://app.example.com", 200),  # listed in TANDEM_ALLOWED_ORIGINS
        ("http://testserver:8081", 401),  # another port: another origin
        ("https://testserver", 401),  # another scheme
        ("https://evil.example.net", 401),
    ],
)
async def test_a_cookie_opens_a_stream_only_for_an_allowed_origin(
    session: Any, alice: Any, settings: Any, origin: str | None, status: int
) -> None:
    # A page of a disallowed origin on the same site makes the browser send the cookie
    # (EventSource withCredentials): it cannot read the stream, but it must not open it
    # either, or it takes the user's connection slots.
    settings.CSRF_TRUSTED_ORIGINS = ["https://app.example.com"]
    cookie = await database_sync_to_async(_session_cookie)(alice)
    headers = {"Cookie": f"sessionid={cookie}", "Host": "testserver"}
    if origin is not None:
        headers["Origin"] = origin
    client = SSEClient(stream_path(session.id), headers=headers)
    assert await client.open() == status
    if status == 200:
        await client.close()
