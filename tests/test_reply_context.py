"""What an agent sees of the conversation before its reply (``services.reply_context``):
the messages before the reply's turn, in turn order, each with the text of its text
parts; not the messages queued behind it, not replies a retry replaced, not tool or
reasoning parts. One SQL statement on SQLite and PostgreSQL alike."""
from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from sessions_app import services
from sessions_app.models import Message, Part

pytestmark = [pytest.mark.django_db]


def message(session: Any, role: str, at: Any, *parts: tuple[str, str], status: str = "completed") -> Message:
    made = Message.objects.create(session=session, role=role, status=status, turn_at=at, created_at=at)
    for index, (kind, text) in enumerate(parts):
        Part.objects.create(message=made, index=index, type=kind, text=text)
    return made


def test_the_agent_sees_the_turns_before_its_reply_with_their_text_parts(shared_session: Any) -> None:
    t = timezone.now() - timedelta(minutes=10)
    message(shared_session, "user", t, ("text", "first question"))
    message(shared_session, "assistant", t + timedelta(seconds=1),
            ("reasoning", "thinking…"), ("text", "one"), ("tool", ""), ("text", "two"))
    replaced = message(shared_session, "assistant", t + timedelta(seconds=2), ("text", "an answer retried away"))
    message(shared_session, "user", t + timedelta(seconds=3))  # no text part at all
    reply = message(shared_session, "assistant", t + timedelta(seconds=4), status="streaming")
    replaced.superseded_by = reply
    replaced.save()
    # Behind the reply: queued, and a later turn.
    message(shared_session, "user", t + timedelta(seconds=5), ("text", "queued behind"), status="queued")
    message(shared_session, "user", t + timedelta(seconds=6), ("text", "a later turn"))

    with CaptureQueriesContext(connection) as queries:
        context = services.reply_context(shared_session.id, reply.id)

    assert context["history"] == [
        {"role": "user", "text": "first question"},
        {"role": "assistant", "text": "one\n\ntwo"},
        {"role": "user", "text": ""},
    ]
    assert len([q for q in queries.captured_queries if q["sql"].lstrip().upper().startswith("SELECT")]) == 1


def test_a_reply_that_is_gone_sees_every_answered_message(shared_session: Any) -> None:
    t = timezone.now() - timedelta(minutes=10)
    message(shared_session, "user", t, ("text", "hello"))
    message(shared_session, "assistant", t + timedelta(seconds=1), ("text", "hi"))
    message(shared_session, "user", t + timedelta(seconds=2), ("text", "waiting"), status="queued")

    context = services.reply_context(shared_session.id, "msg_gone")

    assert context["history"] == [{"role": "user", "text": "hello"}, {"role": "assistant", "text": "hi"}]


def test_other_sessions_do_not_leak_into_the_context(shared_session: Any, alice: Any) -> None:
    other = services.create_session(alice, title="elsewhere", agent="echo")
    t = timezone.now() - timedelta(minutes=10)
    message(other, "user", t, ("text", "secret from another session"))
    message(shared_session, "user", t + timedelta(seconds=1), ("text", "mine"))
    reply = message(shared_session, "assistant", t + timedelta(seconds=2), status="streaming")

    assert services.reply_context(shared_session.id, reply.id)["history"] == [{"role": "user", "text": "mine"}]
