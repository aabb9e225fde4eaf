"""The Python SDK (``tandem_client``) against real daphne processes: typed REST results,
errors as exceptions with the server's codes, token refresh, and event streams that
survive token expiry and server restarts with no gap and no duplicate."""
from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from events_app.publishing import publish_event
from sessions_app.models import Session as SessionRow
from tandem_client import (
    AsyncClient,
    AuthenticationError,
    Client,
    ConflictError,
    Event,
    EventStream,
    Message,
    NetworkError,
    NotFoundError,
    Permission,
    PermissionDeniedError,
    Session,
    TandemError,
    User,
    ValidationError,
)
from tests import conftest
from tests.conftest import PASSWORD, ServerProcess, wait_until

pytestmark = [pytest.mark.slow]

# Heartbeats every half second let a stream-reading thread notice it should stop.
FAST = {"TANDEM_HEARTBEAT_SECONDS": "0.5"}


def client_for(server: ServerProcess, user: Any, **kwargs: Any) -> Client:
    return Client(server.url, username=user.username, password=PASSWORD, **kwargs)


@pytest.fixture
def restart(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """``restart(server, **env)``: stop ``server`` and start a new process on the same
    port and database, as an operator restarting the service would."""
    started: list[ServerProcess] = []

    def restart_server(server: ServerProcess, **env: str) -> ServerProcess:
        server.stop()
        original = conftest.free_port
        conftest.free_port = lambda: server.port  # start_server's only choice we need to change
        try:
            replacement = conftest.start_server({"TANDEM_AGENT_MODE": "inline", **env}, tmp_path, name="restarted")
        finally:
            conftest.free_port = original
        started.append(replacement)
        return replacement

    yield restart_server
    for server in started:
        server.stop()


class Collector:
    """Reads an ``EventStream`` on a thread of its own so the test can act meanwhile."""

    def __init__(self, stream: EventStream) -> None:
        self.stream = stream
        self.events: list[Event] = []
        self.error: BaseException | None = None
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for event in self.stream:
                with self._cond:
                    if event.type != "server.heartbeat":
                        self.events.append(event)
                    self._cond.notify_all()
                    if self._stop:
                        return
        except BaseException as exc:  # reported by wait_for, not lost on a thread
            with self._cond:
                self.error = exc
                self._cond.notify_all()
        finally:
            self.stream.close()

    def seqs(self) -> list[int]:
        with self._cond:
            return [e.seq for e in self.events if e.seq is not None]

    def wait_for(self, predicate: Callable[[list[Event]], Any], timeout: float = 15.0) -> Any:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = predicate(list(self.events))
                if value:
                    return value
                if self.error is not None:
                    raise AssertionError(f"stream failed: {self.error!r}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"not within {timeout}s; got {[(e.seq, e.type) for e in self.events][-20:]}")
                self._cond.wait(min(remaining, 0.5))

    def wait_for_seq(self, seq: int, timeout: float = 15.0) -> None:
        self.wait_for(lambda events: any(e.seq is not None and e.seq >= seq for e in events), timeout)

    def stop(self) -> None:
        with self._cond:
            self._stop = True
        self._thread.join(timeout=10)
        assert not self._thread.is_alive()


def publish_progress(client: Client, session_id: str, values: range) -> list[int]:
    return [client.publish(session_id, "task.progress", {"i": i}).seq for i in values]  # type: ignore[misc]


def reply_text(events: list[Event], reply_id: str) -> str:
    return "".join(
        e.properties["delta"] for e in events
        if e.type == "message.part.updated" and e.properties["message_id"] == reply_id
        and "delta" in e.properties and e.properties["part"]["type"] == "text"
    )


def completed(events: list[Event], reply_id: str) -> Event | None:
    return next((e for e in events if e.type == "message.completed" and e.properties["message_id"] == reply_id), None)


# ---------------------------------------------------------------- REST


def test_rest_calls_return_typed_results(servers: Any, alice: Any, bob: Any) -> None:
    (server,) = servers(1)
    with client_for(server, alice) as tandem:
        session = tandem.create_session("Fix the login bug", agent="tools")
        assert isinstance(session, Session)
        assert (session.title, session.agent, session.role, session.status_type) == ("Fix the login bug", "tools", "owner", "idle")
        assert session.owner == User(alice.pk, "alice")
        assert tandem.get_session(session.id) == session
        assert [s.id for s in tandem.list_sessions()] == [session.id]

        member = tandem.add_member(session.id, "bob", "editor")
        assert (member.user.username, member.role) == ("bob", "editor")
        assert [(m.user.username, m.role) for m in tandem.members(session.id)] == [("alice", "owner"), ("bob", "editor")]

        event = tandem.publish(session.id, "task.progress", {"progress": 50})
        assert isinstance(event, Event) and event.type == "task.progress" and isinstance(event.seq, int)
        assert event.properties["progress"] == 50
        assert event.properties["published_by"] == {"id": alice.pk, "username": "alice"}
        page = tandem.events(session.id, after=event.seq - 1)
        assert [e.seq for e in page.events] == [event.seq] and page.last_seq == event.seq and page.reset is False

        posted = tandem.send_message(session.id, "!calc 6*7")
        assert isinstance(posted.message, Message) and posted.message.text == "!calc 6*7"
        assert posted.message.author == User(alice.pk, "alice") and posted.reply_id
        pending = wait_until(lambda: tandem.permissions(session.id, status="pending"), timeout=10)
        assert isinstance(pending[0], Permission)
        assert (pending[0].tool, pending[0].input, pending[0].message_id) == ("calculator", {"expression": "6*7"}, posted.reply_id)
        answered = tandem.answer_permission(session.id, pending[0].id, approved=True, reason="fine")
        assert (answered.status, answered.approved, answered.reason) == ("approved", True, "fine")
        assert answered.resolved_by == User(alice.pk, "alice")

        def reply() -> Message | None:
            last = tandem.messages(session.id)[-1]
            return last if last.id == posted.reply_id and last.status != "streaming" else None

        message = wait_until(reply, timeout=10)
        assert (message.role, message.status, message.text) == ("assistant", "completed", "6*7 = 42")
        assert tandem.health(session.id)["last_seq"] >= event.seq


def test_server_errors_become_exceptions_with_their_codes(
    servers: Any, shared_session: Any, alice: Any, bob: Any, carol: Any, charlie: Any
) -> None:
    (server,) = servers(1, TANDEM_ECHO_DELAY_MS="20")
    sid = shared_session.id
    with client_for(server, charlie) as outsider:
        with pytest.raises(NotFoundError) as not_found:
            outsider.get_session(sid)
    assert (not_found.value.status, not_found.value.code) == (404, "not_found")

    with client_for(server, bob) as editor:
        with pytest.raises(ValidationError) as invalid:
            editor.create_session("x", agent="no-such-agent")
        assert (invalid.value.status, invalid.value.code) == (400, "validation_error")
        assert "agent" in invalid.value.details

        editor.send_message(sid, " ".join(f"w{i}" for i in range(200)))
        with pytest.raises(ConflictError) as busy:
            editor.send_message(sid, "me too", if_busy="reject")
        assert (busy.value.status, busy.value.code) == (409, "session_busy")
        queued = editor.send_message(sid, "me too")
        assert queued.queued and queued.position == 1 and queued.reply_id is None
        assert queued.message.status == "queued"
        with pytest.raises(ValueError):
            editor.send_message(sid, "x", if_busy="later")
        editor.withdraw_message(sid, queued.message.id)
        assert queued.message.id not in [m.id for m in editor.messages(sid)]
        with pytest.raises(NotFoundError):
            editor.withdraw_message(sid, queued.message.id)
        streaming = [m for m in editor.messages(sid) if m.status == "streaming"][0]
        with pytest.raises(ConflictError) as running:
            editor.retry(sid, streaming.id)
        assert (running.value.status, running.value.code) == (409, "session_busy")
        assert editor.abort(sid) is True
        wait_until(lambda: editor.get_session(sid).status_type == "idle", timeout=10)
        new_reply = editor.retry(sid, streaming.id)
        wait_until(lambda: editor.get_session(sid).status_type == "idle", timeout=10)
        old = [m for m in editor.messages(sid) if m.id == streaming.id][0]
        assert old.status == "cancelled" and old.superseded_by == new_reply

    with client_for(server, carol) as viewer:
        with pytest.raises(PermissionDeniedError) as denied:
            viewer.publish(sid, "task.progress", {})
        assert (denied.value.status, denied.value.code) == (403, "permission_denied")

    with Client(server.url) as anonymous:
        with pytest.raises(AuthenticationError) as bad_login:
            anonymous.login("alice", "wrong password")
        assert (bad_login.value.status, bad_login.value.code) == (401, "authentication_failed")
        with pytest.raises(AuthenticationError) as no_credentials:
            anonymous.list_sessions()
        assert no_credentials.value.code == "not_authenticated"

    with Client("http://127.0.0.1:1", username="alice", password=PASSWORD) as nowhere:
        with pytest.raises(NetworkError) as unreachable:
            nowhere.list_sessions()
    assert (unreachable.value.status, unreachable.value.code) == (0, "network_error")
    with pytest.raises(NetworkError) as bad_url:
        Client("127.0.0.1:8000")
    assert bad_url.value.code == "invalid_url"
    assert all(isinstance(e.value, TandemError) for e in (not_found, invalid, busy, denied, bad_login, unreachable))


def test_a_rejected_access_token_is_refreshed_and_the_call_retried(servers: Any, alice: Any) -> None:
    (server,) = servers(1)
    with client_for(server, alice) as tandem:
        refresh = tandem.login("alice", PASSWORD).refresh
    seen: list[str] = []
    # Only a refresh token, and a stale access token that the server refuses.
    with Client(server.url, access="not-a-valid-jwt", refresh=refresh, on_tokens=lambda t: seen.append(t.access)) as tandem:
        session = tandem.create_session("after refresh")
        assert session.role == "owner"
        assert len(seen) == 1 and tandem.access == seen[0]
    with Client(server.url, refresh="forged") as tandem:
        with pytest.raises(AuthenticationError) as expired:
            tandem.list_sessions()
    assert expired.value.code == "authentication_failed" and "log in again" in expired.value.message


def test_short_lived_tokens_expire_under_rest_calls_and_streams_without_loss(
    servers: Any, shared_session: Any, alice: Any, bob: Any
) -> None:
    (server,) = servers(1, TANDEM_ACCESS_TOKEN_SECONDS="1", **FAST)
    sid = shared_session.id
    refreshed: list[str] = []
    reader = client_for(server, alice, on_tokens=lambda t: refreshed.append(t.access))
    writer = client_for(server, bob)
    head = reader.get_session(sid).last_seq
    collector = Collector(reader.stream(sid, after=head, heartbeats=True))
    published: list[int] = []
    deadline = time.monotonic() + 3.5  # well past several token lifetimes
    while time.monotonic() < deadline:
        published += publish_progress(writer, sid, range(len(published), len(published) + 1))
        time.sleep(0.1)  # pacing the writer, not an assertion
    collector.wait_for_seq(published[-1])
    collector.stop()
    assert collector.seqs() == published
    connects = [e for e in collector.events if e.type == "server.connected"]
    assert len(connects) >= 3, "each expired token should have ended the connection"
    assert all(e.properties["resumed"] for e in connects)
    assert len(refreshed) >= 3
    reader.close()
    writer.close()


# ---------------------------------------------------------------- streams


def test_stream_replays_from_after_then_goes_live_in_order(servers: Any, shared_session: Any, alice: Any, bob: Any) -> None:
    (server,) = servers(1, **FAST)
    sid = shared_session.id
    with client_for(server, bob) as writer, client_for(server, alice) as reader:
        earlier = publish_progress(writer, sid, range(3))
        collector = Collector(reader.stream(sid, after=0, heartbeats=True))
        collector.wait_for_seq(earlier[-1])
        later = publish_progress(writer, sid, range(3, 6))
        collector.wait_for_seq(later[-1])
        collector.stop()
        assert collector.events[0].type == "server.connected"
        assert collector.seqs() == list(range(1, later[-1] + 1))  # the whole log, once each
        assert [e.properties["i"] for e in collector.events if e.type == "task.progress"] == list(range(6))


def test_stream_filters_by_type_and_chat_reply_text_adds_up(servers: Any, shared_session: Any, alice: Any) -> None:
    (server,) = servers(1, **FAST)
    sid = shared_session.id
    text = "streamed  word by word,\nkeeping whitespace"
    with client_for(server, alice) as tandem:
        head = tandem.get_session(sid).last_seq
        collector = Collector(tandem.stream(sid, after=head, types=["message.*"], heartbeats=True))
        posted = tandem.send_message(sid, text)
        done = collector.wait_for(lambda events: completed(events, posted.reply_id))
        collector.stop()
    assert done.properties["status"] == "completed"
    assert reply_text(collector.events, posted.reply_id) == text
    assert {e.type for e in collector.events} <= {
        "server.connected", "message.created", "message.part.updated", "message.completed", "presence.joined"
    }


def test_stream_resumes_across_a_server_restart_with_no_duplicates_and_no_gaps(
    servers: Any, restart: Any, shared_session: Any, alice: Any, bob: Any
) -> None:
    (server,) = servers(1, **FAST)
    sid = shared_session.id
    reader = client_for(server, alice)
    head = reader.get_session(sid).last_seq
    collector = Collector(reader.stream(sid, after=head, heartbeats=True, backoff=(0.1, 1.0)))
    with client_for(server, bob) as writer:
        before = publish_progress(writer, sid, range(3))
    collector.wait_for_seq(before[-1])

    server.stop()
    # Published while no server runs: only a resume from the last seq can deliver these.
    during = [publish_event(sid, "task.progress", {"i": i}, as_user="bob")["seq"] for i in range(3, 5)]
    replacement = restart(server, **FAST)
    with client_for(replacement, bob) as writer:
        after = publish_progress(writer, sid, range(5, 8))
    collector.wait_for_seq(after[-1], timeout=30)
    collector.stop()
    reader.close()

    assert collector.seqs() == before + during + after
    assert [e.properties["i"] for e in collector.events if e.type == "task.progress"] == list(range(8))
    connects = [e for e in collector.events if e.type == "server.connected"]
    assert len(connects) == 2 and connects[1].properties["resumed"] is True


def test_stream_surfaces_a_reset_when_its_position_cannot_be_resumed(
    servers: Any, shared_session: Any, alice: Any, bob: Any
) -> None:
    (server,) = servers(1, **FAST)
    sid = shared_session.id
    resets: list[Event] = []
    with client_for(server, alice) as reader, client_for(server, bob) as writer:
        head = reader.get_session(sid).last_seq
        stream = reader.stream(sid, after=head + 1000, on_reset=resets.append, heartbeats=True)
        collector = Collector(stream)
        reset = collector.wait_for(lambda events: next((e for e in events if e.type == "stream.reset"), None))
        assert reset.properties == {"reason": "unknown_position", "last_seq": head}
        assert resets == [reset]
        live = publish_progress(writer, sid, range(2))
        collector.wait_for_seq(live[-1])
        collector.stop()
    assert collector.seqs() == live
    assert stream.last_seq == live[-1]


def test_stream_ends_after_the_session_is_deleted(servers: Any, alice: Any) -> None:
    (server,) = servers(1)
    with client_for(server, alice) as tandem:
        session = tandem.create_session("short-lived")
        stream = tandem.stream(session.id, max_retries=0)  # bounded: a missing event fails, never hangs
        assert next(stream).type == "server.connected"
        tandem.delete_session(session.id)
        rest = [e.type for e in stream if e.type != "presence.joined"]
    assert rest == ["session.deleted"]
    assert not SessionRow.objects.filter(pk=session.id).exists()


# ---------------------------------------------------------------- asyncio


async def test_async_client_streams_a_reply_and_resumes_after_a_restart(
    servers: Any, restart: Any, shared_session: Any, alice: Any, bob: Any
) -> None:
    (server,) = servers(1)
    sid = shared_session.id
    text = "async all the way down"
    async with AsyncClient(server.url, username="alice", password=PASSWORD) as tandem:
        session = await tandem.get_session(sid)
        assert isinstance(session, Session) and session.role == "owner"
        with pytest.raises(ConflictError):  # a typed error from the async path too
            await tandem.add_member(sid, "bob", "editor")

        events: list[Event] = []
        stream = tandem.stream(sid, after=session.last_seq, backoff=(0.1, 1.0))
        assert (await stream.__anext__()).type == "server.connected"
        posted = await tandem.send_message(sid, text)

        async def until(predicate: Callable[[list[Event]], Any]) -> None:
            async for event in stream:
                events.append(event)
                if predicate(events):
                    return

        await asyncio.wait_for(until(lambda evs: completed(evs, posted.reply_id)), timeout=15)
        assert reply_text(events, posted.reply_id) == text

        await asyncio.to_thread(server.stop)
        during = await asyncio.to_thread(lambda: publish_event(sid, "task.progress", {"i": 1}, as_user="bob")["seq"])
        replacement = await asyncio.to_thread(restart, server)
        async with AsyncClient(replacement.url, username="bob", password=PASSWORD) as writer:
            live = (await writer.publish(sid, "task.progress", {"i": 2})).seq
        await asyncio.wait_for(until(lambda evs: evs[-1].seq == live), timeout=30)
        await stream.aclose()

    seqs = [e.seq for e in events if e.seq is not None]
    assert seqs == list(range(session.last_seq + 1, live + 1))  # type: ignore[operator]
    assert during in seqs
