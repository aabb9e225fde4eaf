"""What a message post and an echo reply cost in SQL statements: counts, not times
(docs/PERFORMANCE.md, "Issue 12: message posts"). A post's three events, a streamed
delta, and a short reply's every event are each one batch: one seq ``UPDATE`` and one
``INSERT``, however many events. If a change adds statements to this path, these fail:
raise a bound only knowingly."""
from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from events_app.models import Event
from sessions_app import services
from sessions_app.agents.base import AGENTS, Agent, Output, ReplyContext, TextDelta
from sessions_app.models import Part, Session, new_part_id
from tests.replies import head, log_after, post, wait_for_completed, wait_for_event, wait_idle

pytestmark = [pytest.mark.django_db(transaction=True)]


def statements(captured: CaptureQueriesContext) -> list[str]:
    """The statements that read or write rows (SQLite's BEGIN/COMMIT are logged as
    queries, PostgreSQL's are not: leave them out on both)."""
    sql = [q["sql"] for q in captured.captured_queries]
    assert not [s for s in sql if "SAVEPOINT" in s.upper()], "no savepoints on the write path"
    return [s for s in sql if s.split()[0].upper() in ("SELECT", "INSERT", "UPDATE", "DELETE")]


def writes(sql: list[str], table: str) -> int:
    return sum(1 for s in sql if s.split()[0].upper() in ("INSERT", "UPDATE") and table in s)


def test_a_post_and_a_short_echo_reply_cost_a_bounded_number_of_statements(
    shared_session: Any, bob: Any, settings: Any
) -> None:
    settings.TANDEM_AGENT_MODE = "worker"  # the reply is run by hand below, as a worker would
    session_id = shared_session.id
    before = head(session_id)
    with CaptureQueriesContext(connection) as posting:
        response = post(bob, session_id, "hi")
    assert response.status_code == 202, response.content
    reply_id = response.json()["reply_id"]
    sql = statements(posting)
    # Token user, membership, the session's lock, the count of queued messages, the two
    # messages in one INSERT, a part, the run, one seq UPDATE for three events (and the
    # busy status), one INSERT of them. The response shows the message as its event did:
    # no read of its parts.
    assert len(sql) <= 9, sql
    assert writes(sql, "events_app_event") == 1 and writes(sql, "sessions_app_session") == 1
    assert head(session_id) == before + 3

    # The worker's side, as the runner does it for a reply that is done before its first
    # words are written (echo of one word): claim, read the context, then one transaction.
    with CaptureQueriesContext(connection) as replying:
        [run] = services.claim_runs("runner-1", 10)
        assert run.message_id == reply_id and run.runner == "runner-1" and not run.abort_requested
        assert services.reply_context(session_id, reply_id)["history"][-1] == {"role": "user", "text": "hi"}
        part_id = new_part_id()
        assert services.finish_reply(
            session_id, reply_id, runner="runner-1", status="completed", text_parts=[(part_id, "hi")],
            writes=[services.TextWrite(part_id, "text", "hi", "hi", index=0)], asked_permission=False,
        )
    sql = statements(replying)
    # The claim 1 (its row says whether an abort was asked before it); the history 1; the
    # run's row 1 (deleted, who asked to abort returned); the part 1; the parts and the
    # message 2 (no permissions to close: the runner asked none); the session's lock and
    # the queue 2 (the next turn, or idle); one seq UPDATE and one INSERT for five events.
    assert len(sql) <= 10, "\n".join(s[:110] for s in sql)
    assert writes(sql, "events_app_event") == 1 and writes(sql, "sessions_app_session") == 1
    events = [orjson.loads(e) for e in Event.objects.filter(session_id=session_id, seq__gt=before + 3)
              .order_by("seq").values_list("envelope", flat=True)]
    assert [e["type"] for e in events] == [
        "message.part.updated", "message.part.updated", "message.part.updated", "message.completed",
        "session.status",
    ]
    start, delta, final = (e["properties"]["part"] for e in events[:3])
    assert start == {"id": part_id, "type": "text", "text": ""} and events[1]["properties"]["delta"] == "hi"
    assert final == {"id": part_id, "type": "text", "text": "hi"}
    assert [e["seq"] for e in events] == list(range(before + 4, before + 9))
    assert head(session_id) == before + 8


def test_a_streamed_delta_costs_three_statements(shared_session: Any, bob: Any) -> None:
    session_id = shared_session.id
    response = post(bob, session_id, "hello there")
    reply_id = response.json()["reply_id"]
    part_id = new_part_id()
    with CaptureQueriesContext(connection) as first:
        services.write_parts(reply_id, session_id, [services.TextWrite(part_id, "text", "hello ", "hello ", index=0)])
    with CaptureQueriesContext(connection) as later:
        services.write_parts(reply_id, session_id, [services.TextWrite(part_id, "text", "hello there", "there")])
    # The part's row (created, then its text), one seq UPDATE, one INSERT.
    assert len(statements(first)) == 3, statements(first)
    assert len(statements(later)) == 3, statements(later)
    assert Part.objects.get(pk=part_id).text == "hello there"


_release = threading.Event()


class _SlowAfterFirstWords(Agent):
    """Says its first words, then waits for the test before saying the rest."""

    name = "test-first-words"

    async def reply(self, ctx: ReplyContext) -> AsyncIterator[Output]:
        yield TextDelta("first ")
        await asyncio.to_thread(_release.wait, 10)
        yield TextDelta("and the rest")


def test_a_streaming_agents_first_words_are_written_while_it_is_still_working(
    shared_session: Any, bob: Any
) -> None:
    """Writing a short reply whole with its finish must not hold back a streaming
    agent's first words until it finishes (time to first token)."""
    AGENTS[_SlowAfterFirstWords.name] = _SlowAfterFirstWords
    _release.clear()
    try:
        Session.objects.filter(pk=shared_session.pk).update(agent=_SlowAfterFirstWords.name)
        before = head(shared_session.id)
        response = post(bob, shared_session.id, "go")
        assert response.status_code == 202, response.content
        reply_id = response.json()["reply_id"]
        first = wait_for_event(
            shared_session.id, before, "message.part.updated", lambda e: "delta" in e["properties"]
        )
        assert first["properties"]["delta"] == "first " and not _release.is_set()
        _release.set()
        wait_for_completed(shared_session.id, before, reply_id)
        deltas = [
            e["properties"]["delta"] for e in log_after(shared_session.id, before)
            if e["type"] == "message.part.updated" and "delta" in e["properties"]
        ]
        assert "".join(deltas) == "first and the rest"
        wait_idle(shared_session.id)
    finally:
        _release.set()
        AGENTS.pop(_SlowAfterFirstWords.name, None)
