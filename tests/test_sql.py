"""``project.sql``: the plain statements of the hot write path store and read rows exactly
as the ORM does, on SQLite and PostgreSQL alike."""
from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.db import transaction
from django.utils import timezone

from project import sql
from sessions_app.models import Message, Part, ReplyRun, Session

pytestmark = [pytest.mark.django_db]


def test_inserted_rows_read_back_through_the_orm_unchanged(shared_session: Any, bob: Any) -> None:
    at = timezone.now() - timedelta(minutes=3)
    message = Message(
        session=shared_session, role="user", author=bob, status="completed", created_at=at, turn_at=at,
        completed_at=at, error={"code": "x", "message": "ünïcode ✓"}, usage={"total_tokens": 3},
    )
    parts = [Part(message=message, index=i, type="text", text=t) for i, t in enumerate(["a", "bé"])]
    sql.insert([message])
    sql.insert(parts)
    stored = Message.objects.get(pk=message.pk)
    assert (stored.author_id, stored.status, stored.created_at, stored.turn_at, stored.completed_at) == (
        bob.pk, "completed", at, at, at
    )
    assert stored.error == {"code": "x", "message": "ünïcode ✓"} and stored.usage == {"total_tokens": 3}
    assert [(p.index, p.text, p.state) for p in stored.parts.order_by("index")] == [(0, "a", None), (1, "bé", None)]
    # Saved rows are no longer "adding": a later save() updates them.
    message.status = "error"
    message.save(update_fields=["status"])
    assert Message.objects.get(pk=message.pk).status == "error"


def test_insert_takes_one_model_and_needs_the_primary_key(shared_session: Any) -> None:
    message = Message(session=shared_session, role="user", status="completed")
    with pytest.raises(ValueError):
        sql.insert([message, Part(message=message, index=0, type="text")])
    with pytest.raises(ValueError):
        sql.insert([ReplyRun(session=shared_session, agent="echo")])
    sql.insert([])  # nothing to do


def test_get_reads_a_row_as_the_orm_does(shared_session: Any, bob: Any) -> None:
    for model, pk in ((Session, shared_session.pk), (User, bob.pk)):
        read, orm = sql.get(model, pk), model.objects.get(pk=pk)
        assert read is not None and not read._state.adding
        fields = [f.attname for f in model._meta.concrete_fields]
        assert {f: getattr(read, f) for f in fields} == {f: getattr(orm, f) for f in fields}
    assert isinstance(sql.get(User, bob.pk).is_active, bool)  # type: ignore[union-attr]


def test_get_of_a_missing_row_is_none() -> None:
    assert sql.get(Session, "ses_missing") is None
    assert sql.get(User, 987654321) is None


def test_get_with_its_lock_inside_a_transaction(shared_session: Any) -> None:
    with transaction.atomic():
        locked = sql.get(Session, shared_session.pk, lock=True)
        assert locked is not None and locked.pk == shared_session.pk


def test_update_sets_fields_as_the_orm_does(shared_session: Any) -> None:
    message = Message(session=shared_session, role="assistant", status="streaming", error={"code": "old"})
    sql.insert([message])
    done = timezone.now()
    assert sql.update(Message, message.pk, status="completed", error=None, completed_at=done, usage={"n": 1}) == 1
    stored = Message.objects.get(pk=message.pk)
    assert (stored.status, stored.error, stored.completed_at, stored.usage) == ("completed", None, done, {"n": 1})
    assert sql.update(Message, "msg_missing", status="error") == 0


def test_children_are_read_in_order_as_the_orm_reads_them(shared_session: Any) -> None:
    message = Message(session=shared_session, role="assistant", status="completed")
    sql.insert([message])
    sql.insert([
        Part(message=message, index=2, type="tool", tool="calc", call_id="c1", state={"status": "running", "input": [1]}),
        Part(message=message, index=0, type="text", text="first"),
        Part(message=message, index=1, type="reasoning", text="hmm"),
    ])
    read = sql.children(Part, "message", message.pk, order="index")
    orm = list(Part.objects.filter(message=message).order_by("index"))
    fields = [f.attname for f in Part._meta.concrete_fields]
    assert [{f: getattr(p, f) for f in fields} for p in read] == [{f: getattr(p, f) for f in fields} for p in orm]
    assert [p.index for p in read] == [0, 1, 2] and read[2].state == {"status": "running", "input": [1]}
    assert sql.children(Part, "message", "msg_missing", order="index") == []


def test_returned_rows_become_instances_as_the_orm_reads_them(shared_session: Any) -> None:
    from django.db import connection

    message = Message(session=shared_session, role="assistant", status="streaming")
    sql.insert([message])
    sql.insert([ReplyRun(message=message, session=shared_session, agent="echo", abort_requested=True)])
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE sessions_app_replyrun SET runner = %s WHERE message_id = %s RETURNING {sql.columns(ReplyRun)}",
            ["runner-1", message.pk],
        )
        [run] = sql.instances(ReplyRun, cursor.fetchall())
    orm = ReplyRun.objects.get(pk=message.pk)
    fields = [f.attname for f in ReplyRun._meta.concrete_fields]
    assert {f: getattr(run, f) for f in fields} == {f: getattr(orm, f) for f in fields}
    assert run.abort_requested is True and run.runner == "runner-1" and run.created_at.tzinfo is not None
