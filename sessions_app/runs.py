"""The run queue: a reply waits as a ``ReplyRun`` row until a runner claims it under a
lease, renews the lease while it runs, and ends it (``finish_reply``); lapsed leases are
reaped. Also every write a runner makes to its reply (parts, tool states, the session's
status). The agents layer (``sessions_app.agents``) calls these; it is above this module,
so in inline mode it registers how to wake its pool (``register_local_pool``)."""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from events_app import fanout, groups
from events_app.services import publish_many
from events_app.types import iso
from project import runtime, sql
from sessions_app.models import Message, Part, PermissionRequest, ReplyRun, Session
from sessions_app.permissions import close_permissions
from sessions_app.serializers import message_data, part_data

log = logging.getLogger(__name__)


def dispatch() -> None:
    """A reply was queued: wake whoever runs replies. Called after the commit."""
    if settings.TANDEM_AGENT_MODE == "inline":
        if _wake_local_pool is None:
            log.error("A reply was queued but no agents pool is registered in this process")
            return
        runtime.call_soon(_wake_local_pool)
    else:
        fanout.send_control(groups.WORKERS_GROUP, groups.Wake())


# The agents layer sits above this module: in inline mode it registers how to wake this
# process's pool (sessions_app.apps), so queuing a reply does not import it.
_wake_local_pool: Callable[[], None] | None = None


def register_local_pool(wake: Callable[[], None]) -> None:
    global _wake_local_pool
    _wake_local_pool = wake


def set_session_status(session_id: str, status: dict[str, Any]) -> None:
    with transaction.atomic():
        publish_status(session_id, status)


def publish_status(session_id: str, status: dict[str, Any]) -> None:
    """Set the session's status and publish it, in the caller's transaction: the status
    is set by the same statement that takes the event's seq."""
    publish_many(session_id, [_status_event(status)], session_fields={"status": status})


def _status_event(status: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return "session.status", {"status": status}


# ---------------------------------------------------------------- runs (the runner)


def claim_runs(runner: str, limit: int) -> list[ReplyRun]:
    """Take up to ``limit`` queued replies for ``runner``. The conditional UPDATE is the
    claim: of several runners racing for a row, exactly one changes it."""
    now = timezone.now()
    lease = now + timedelta(seconds=settings.TANDEM_RUN_LEASE_SECONDS)
    # One statement whatever the number claimed (and when there is none to claim, the
    # common case of a wake-up another runner won). Rows another runner is claiming are
    # skipped where the database can (PostgreSQL), else waited for and re-checked by
    # the outer ``runner = ''``.
    table = connection.ops.quote_name(ReplyRun._meta.db_table)
    skip = " FOR UPDATE SKIP LOCKED" if connection.features.has_select_for_update_skip_locked else ""
    adapt = connection.ops.adapt_datetimefield_value
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {table} SET runner = %s, lease_until = %s, started_at = %s "
            f"WHERE runner = '' AND message_id IN (SELECT message_id FROM {table} WHERE runner = '' "
            f"ORDER BY created_at LIMIT %s{skip}) RETURNING {sql.columns(ReplyRun)}",
            [runner, adapt(lease), adapt(now), limit],
        )
        claimed = sql.instances(ReplyRun, cursor.fetchall())
    return sorted(claimed, key=lambda run: run.created_at)


def reply_counts() -> dict[str, int]:
    """Replies waiting for a runner and replies being run, across every process."""
    queued = ReplyRun.objects.filter(runner="").count()
    return {"queued": queued, "running": ReplyRun.objects.count() - queued}


def renew_leases(runner: str, message_ids: list[str]) -> tuple[set[str], set[str]]:
    """Extend the leases of the runs ``runner`` holds. Returns (runs it no longer holds,
    runs asked to abort) so the runner can stop both."""
    if not message_ids:
        return set(), set()
    lease = timezone.now() + timedelta(seconds=settings.TANDEM_RUN_LEASE_SECONDS)
    ReplyRun.objects.filter(pk__in=message_ids, runner=runner).update(lease_until=lease)
    held = dict(
        ReplyRun.objects.filter(pk__in=message_ids, runner=runner).values_list("pk", "abort_requested")
    )
    lost = set(message_ids) - set(held)
    return lost, {pk for pk, wanted in held.items() if wanted}


def reap_expired_runs() -> int:
    """End every reply whose runner stopped renewing its lease (the process died):
    ``error`` with code ``interrupted``, the session idle. Returns how many."""
    now = timezone.now()
    expired = ReplyRun.objects.filter(lease_until__lt=now).exclude(runner="")
    return sum(_interrupt(run, lease_expired_before=now) for run in expired)


def interrupt_runs(runner: str, message_ids: list[str]) -> int:
    """A runner shutting down ends the replies it could not finish."""
    held = ReplyRun.objects.filter(pk__in=message_ids, runner=runner)
    return sum(_interrupt(run) for run in held)


def _interrupt(run: ReplyRun, lease_expired_before: Any = None) -> bool:
    # The text persisted so far (at most one coalescing interval behind) is what stays.
    text_parts = list(
        Part.objects.filter(message_id=run.message_id)
        .exclude(type=Part.PartType.TOOL)
        .values_list("id", "text")
    )
    return finish_reply(
        run.session_id, run.message_id, runner=run.runner, status=Message.Status.ERROR,
        error={"code": "interrupted", "message": "The process running this reply stopped."},
        text_parts=text_parts, lease_expired_before=lease_expired_before,
    )


def reply_context(session_id: str, message_id: str) -> dict[str, Any]:
    """What an agent sees: the session's messages before the reply — not the messages
    still queued behind it, nor replies a retry replaced — each with the text of its text
    parts. One statement (every reply reads it before its agent starts; the ORM's two
    queries cost the worker more than the rest of a short reply)."""
    quote = connection.ops.quote_name
    messages, parts = quote(Message._meta.db_table), quote(Part._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT m.id, m.role, p.text FROM {messages} m "
            f"LEFT JOIN {parts} p ON p.message_id = m.id AND p.type = %s "
            "WHERE m.session_id = %s AND m.superseded_by_id IS NULL AND m.id <> %s AND m.status <> %s "
            # Before the reply's turn (all of them if the reply is gone).
            f"AND NOT EXISTS (SELECT 1 FROM {messages} r WHERE r.id = %s AND r.turn_at <= m.turn_at) "
            f"ORDER BY m.turn_at, m.id, p.{quote('index')}",
            [Part.PartType.TEXT, session_id, message_id, Message.Status.QUEUED, message_id],
        )
        rows = cursor.fetchall()
    history: list[dict[str, Any]] = []
    texts: list[list[str]] = []
    last = None
    for message, role, text in rows:
        if message != last:
            last = message
            texts.append([])
            history.append({"role": role, "text": ""})
        if text is not None:
            texts[-1].append(text)
    for entry, joined in zip(history, texts, strict=True):
        entry["text"] = "\n\n".join(joined)
    return {"history": history}


@dataclass(frozen=True)
class TextWrite:
    """A runner's coalesced text for one part: ``delta`` is new since its last write,
    ``text`` the part's whole text so far. ``index`` is set for a part not stored yet:
    its start and first words are written together."""

    part_id: str
    part_type: str
    text: str
    delta: str
    index: int | None = None


def write_parts(message_id: str, session_id: str, writes: list[TextWrite]) -> None:
    """Store the runner's coalesced text of one or more parts and send the deltas: one
    transaction, one batch of events."""
    with transaction.atomic():
        publish_many(session_id, _text_write_events(message_id, writes))


def _text_write_events(message_id: str, writes: list[TextWrite]) -> list[tuple[str, dict[str, Any]]]:
    events: list[tuple[str, dict[str, Any]]] = []
    for write in writes:
        if write.index is not None:
            part = Part(id=write.part_id, message_id=message_id, index=write.index, type=write.part_type, text="")
            events.append(("message.part.updated", {"message_id": message_id, "part": part_data(part)}))
            part.text = write.text
            sql.insert([part])
        else:
            sql.update(Part, write.part_id, text=write.text)
        if write.delta:
            events.append(_delta_event(message_id, write.part_id, write.part_type, write.delta))
    return events


def _delta_event(message_id: str, part_id: str, part_type: str, delta: str) -> tuple[str, dict[str, Any]]:
    return (
        "message.part.updated",
        {"message_id": message_id, "part": {"id": part_id, "type": part_type}, "delta": delta},
    )


def start_tool_part(
    message_id: str, session_id: str, index: int, tool: str, call_id: str, input: Any
) -> Part:
    with transaction.atomic():
        part = Part.objects.create(
            message_id=message_id, index=index, type=Part.PartType.TOOL, tool=tool,
            call_id=call_id, state={"status": "pending", "input": input},
        )
        _publish_tool_state(session_id, message_id, part)
    return part


def set_tool_state(part_id: str, session_id: str, message_id: str, state: dict[str, Any]) -> None:
    with transaction.atomic():
        part = Part.objects.get(pk=part_id)
        part.state = {"input": (part.state or {}).get("input"), **state}
        part.save(update_fields=["state"])
        _publish_tool_state(session_id, message_id, part)


def _publish_tool_state(session_id: str, message_id: str, part: Part) -> None:
    publish_many(session_id, _tool_state_events(message_id, part))


def _tool_state_events(message_id: str, part: Part) -> list[tuple[str, dict[str, Any]]]:
    """A tool part's new state: the part, then ``tool.status``."""
    state = part.state or {}
    props: dict[str, Any] = {
        "message_id": message_id, "call_id": part.call_id, "tool": part.tool,
        "status": state.get("status"),
    }
    for key in ("input", "output", "error"):
        if key in state:
            props[key] = state[key]
    return [
        ("message.part.updated", {"message_id": message_id, "part": part_data(part)}),
        ("tool.status", props),
    ]


def finish_reply(
    session_id: str,
    message_id: str,
    *,
    runner: str,
    status: str,
    error: dict[str, str] | None = None,
    text_parts: list[tuple[str, str]] = (),  # type: ignore[assignment]
    usage: dict[str, int] | None = None,
    lease_expired_before: Any = None,
    writes: list[TextWrite] = (),  # type: ignore[assignment]
    asked_permission: bool = True,
) -> bool:
    """End a reply: the runner's last coalesced text (``writes``, as ``write_parts``),
    each open part's complete state, open tools and pending permissions closed, then
    message.completed, then the session idle, all in one transaction and one batch of
    events. Only the runner holding the run may end it, once; returns False when it no
    longer does (and writes nothing). ``asked_permission=False``: the runner knows the
    reply asked none, so there are none to close (only a reply's own runner asks
    permission for it)."""
    with transaction.atomic():
        held, abort_by_id = _release_run(message_id, runner, lease_expired_before)
        if not held:
            return False
        events = _text_write_events(message_id, list(writes))
        # One read of the reply's parts serves both the text parts' final states and the
        # open tools.
        parts = {part.id: part for part in sql.children(Part, "message", message_id, order="index")}
        for part_id, text in text_parts:
            part = parts[part_id]
            if part.text != text:  # the runner's last flush has usually stored it already
                sql.update(Part, part_id, text=text)
                part.text = text
            events.append(("message.part.updated", {"message_id": message_id, "part": part_data(part)}))
        endings: dict[str, str] = {
            Message.Status.CANCELLED: "The reply was aborted.",
            Message.Status.ERROR: error.get("message", "The reply failed.") if error else "The reply failed.",
        }
        why = endings.get(status, "The reply ended.")
        for part in parts.values():
            if part.type != Part.PartType.TOOL or (part.state or {}).get("status") not in ("pending", "running"):
                continue
            part.state = {"input": (part.state or {}).get("input"), "status": "error", "error": why}
            part.save(update_fields=["state"])
            events += _tool_state_events(message_id, part)
        if asked_permission:
            by_timeout = status != Message.Status.CANCELLED or abort_by_id is None
            events += close_permissions(
                session_id, message_id, why,
                resolved_by_id=None if by_timeout else abort_by_id,
                status=PermissionRequest.Status.EXPIRED if by_timeout else PermissionRequest.Status.REJECTED,
            )
        fields: dict[str, Any] = {"status": status, "error": error, "completed_at": timezone.now()}
        if usage:
            fields["usage"] = usage
        sql.update(Message, message_id, **fields)
        props: dict[str, Any] = {"message_id": message_id, "status": status}
        if error:
            props["error"] = error
        events.append(("message.completed", props))
        # The session's row lock after the reply's own rows (the order of every other
        # writer's locks), and before the queue is read: a post racing with this either
        # committed its queued message already or waits and then finds the session idle.
        lock_session(session_id)
        start_next_turn(session_id, events)
    return True


def _release_run(message_id: str, runner: str, lease_expired_before: Any) -> tuple[bool, int | None]:
    """Delete the run if ``runner`` holds it (and, for the reaper, its lease lapsed before
    ``lease_expired_before``): (whether it did, who asked to abort). One statement, where
    the ORM took a read with a join and a delete."""
    table = connection.ops.quote_name(ReplyRun._meta.db_table)
    sql = f"DELETE FROM {table} WHERE message_id = %s AND runner = %s"
    params: list[Any] = [message_id, runner]
    if lease_expired_before is not None:
        sql += " AND lease_until < %s"
        params.append(connection.ops.adapt_datetimefield_value(lease_expired_before))
    with connection.cursor() as cursor:
        cursor.execute(f"{sql} RETURNING abort_by_id", params)
        row = cursor.fetchone()
    return (False, None) if row is None else (True, row[0])


def queued_count(session_id: str) -> int:
    """How many messages wait in the session's queue. Read after ``lock_session``, as a
    statement of its own (see there)."""
    table = connection.ops.quote_name(Message._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT COUNT(*) FROM {table} WHERE session_id = %s AND status = %s",
                       [session_id, Message.Status.QUEUED])
        return int(cursor.fetchone()[0])


def start_next_turn(session_id: str, events: list[tuple[str, dict[str, Any]]]) -> Message | None:
    """The reply ended: answer the oldest queued message, or make the session idle when
    none waits. In the transaction that ended the reply, so the queue moves on even when
    the process that ran it dies right after; the reply it queues is claimed by whichever
    runner is up. The caller holds the session's row lock (``lock_session``), taken after
    the reply's own rows; ``events`` (the reply's closing ones) go out first, in the same
    batch as the idle status or the next turn's."""
    table = connection.ops.quote_name(Message._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT id FROM {table} WHERE session_id = %s AND status = %s ORDER BY turn_at, id LIMIT 1",
            [session_id, Message.Status.QUEUED],
        )
        waiting = cursor.fetchone()
    if waiting is None:
        idle = {"type": "idle"}
        publish_many(session_id, [*events, _status_event(idle)], session_fields={"status": idle})
        return None
    now = timezone.now()
    sql.update(Message, waiting[0], status=Message.Status.COMPLETED, completed_at=now, turn_at=now)
    updated = ("message.updated", {"message_id": waiting[0], "status": Message.Status.COMPLETED})
    return queue_reply(session_id, after=now, first=[*events, updated])


def new_reply(session_id: str, after: Any) -> Message:
    """An agent's reply (not saved yet) that takes its turn just after ``after``."""
    return Message(
        session_id=session_id, role=Message.MessageRole.ASSISTANT, status=Message.Status.STREAMING,
        created_at=timezone.now(), turn_at=after + timedelta(microseconds=1),
    )


def queue_reply(
    session_id: str, *, after: Any, agent: str | None = None,
    first: list[tuple[str, dict[str, Any]]] | None = None, reply: Message | None = None,
) -> Message:
    """Mark the session busy and queue an agent's reply that takes its turn just after
    ``after`` (the message it answers). In the caller's transaction; ``first`` are events
    that go out before the reply's, in the same batch (the message it answers). ``reply``:
    the reply from ``new_reply``, when the caller saved it already (in one ``INSERT`` with
    the message it answers)."""
    if agent is None:
        agent = Session.objects.values_list("agent", flat=True).get(pk=session_id)
    if reply is None:
        reply = new_reply(session_id, after)
        sql.insert([reply])
    sql.insert([ReplyRun(message=reply, session_id=session_id, agent=agent)])
    busy = {"type": "busy"}
    # One batch: the status is set by the statement that takes the events' seqs.
    events = [*(first or []), _status_event(busy), ("message.created", {"message": message_data(reply, [])})]
    publish_many(session_id, events, session_fields={"status": busy})
    transaction.on_commit(dispatch)
    return reply


def lock_session(session_id: str) -> Session | None:
    """Take the session's row lock first, in every transaction that moves its queue:
    posting, ending a reply, withdrawing and retrying then happen one at a time, and in
    the same order of locks (no deadlock). The row is read as the lock holder before us
    left it; anything else must be read by a later statement, which sees what that holder
    committed (a subquery of this one would not: READ COMMITTED takes the snapshot of a
    statement before it waits for the lock)."""
    return sql.get(Session, session_id, lock=True)


def current_run(session_id: str) -> dict[str, Any] | None:
    """The session's reply in progress: ``queued`` until a runner claims it (then
    ``started_at`` is set), ``running`` after."""
    run = ReplyRun.objects.filter(session_id=session_id).order_by("-created_at").first()
    if run is None:
        return None
    return {
        "message_id": run.message_id,
        "state": "running" if run.runner else "queued",
        "queued_at": iso(run.created_at),
        "started_at": iso(run.started_at) if run.runner and run.started_at else None,
    }
