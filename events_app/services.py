"""The event log's services: the one place events are persisted and sent, history and
resume planning for readers, retention."""
from __future__ import annotations

import asyncio
import atexit
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson
from django.conf import settings
from django.db import connection, transaction
from django.db.models import Q
from django.utils import timezone

from events_app import fanout, groups
from events_app.metrics import EVENTS_PUBLISHED
from events_app.models import Event
from events_app.types import Frame, TypeFilter, custom_type_problem, encode, is_persisted, iso
from project import runtime
from project.db import off_loop
from project.errors import BadRequest, NotFound, PayloadTooLarge, ValidationFailed

log = logging.getLogger(__name__)


def publish(session_id: str, type_name: str, properties: dict[str, Any]) -> Frame:
    """Append an event to the session's log and send it to every process once the
    surrounding transaction commits. Safe with any number of concurrent writers: the
    UPDATE of the session row serialises them, so seqs are contiguous and unique."""
    return publish_many(session_id, [(type_name, properties)])[0]


def publish_many(
    session_id: str,
    events: Sequence[tuple[str, dict[str, Any]]],
    *,
    session_fields: Mapping[str, Any] | None = None,
) -> list[Frame]:
    """``publish`` for several events of one session at once, in order: one ``UPDATE``
    takes all their seqs (and sets ``session_fields``, columns of the session row such as
    its status, in the same statement) and one ``INSERT`` stores them, so a batch costs
    two statements however many events it holds (docs/PERFORMANCE.md, "posts")."""
    from sessions_app.models import Session

    if not events:
        raise ValueError("publish_many() needs at least one event")
    for type_name, _ in events:
        if not is_persisted(type_name):
            raise ValueError(f"{type_name} is ephemeral: use broadcast()")
    # No savepoint inside a caller's transaction: a failure here fails the caller's whole
    # transaction anyway, and a savepoint costs two round trips per event.
    with transaction.atomic(savepoint=False):
        now = timezone.now()
        last = _take_seqs(Session, session_id, len(events), now, session_fields or {})
        if last is None:
            raise NotFound()
        first = last - len(events) + 1
        stamp = iso(now)
        frames = [
            Frame(
                seq, session_id, type_name,
                encode(seq=seq, session_id=session_id, type_name=type_name, time=stamp, properties=properties),
            )
            for seq, (type_name, properties) in enumerate(events, start=first)
        ]
        _insert_events(frames, now)
        keep = settings.TANDEM_EVENT_RETENTION_COUNT
        if last > keep:
            Event.objects.filter(session_id=session_id, seq__lte=last - keep).delete()
        group = groups.session_group(session_id)
        transaction.on_commit(lambda: fanout.send_frames(group, frames))
        EVENTS_PUBLISHED.inc(len(frames))
    return frames


def _take_seqs(
    model: Any, session_id: str, count: int, now: datetime, fields: Mapping[str, Any]
) -> int | None:
    """Take the session's next ``count`` seqs, returning the last: one ``UPDATE ...
    RETURNING`` (SQLite >= 3.35 and PostgreSQL) in place of an update and a read. The row
    lock it takes is what orders concurrent publishers until the transaction ends."""
    quote = connection.ops.quote_name
    assignments = ["last_seq = last_seq + %s", "last_activity_at = %s"]
    params: list[Any] = [count, connection.ops.adapt_datetimefield_value(now)]
    for name, value in fields.items():
        field = model._meta.get_field(name)
        assignments.append(f"{quote(field.column)} = %s")
        params.append(field.get_db_prep_save(value, connection))
    params.append(session_id)
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {quote(model._meta.db_table)} SET {', '.join(assignments)} "
            "WHERE id = %s RETURNING last_seq",
            params,
        )
        row = cursor.fetchone()
    return None if row is None else int(row[0])


def _insert_events(frames: list[Frame], now: datetime) -> None:
    """One multi-row ``INSERT`` (the ORM's ``bulk_create`` would also ask PostgreSQL for
    the new ids, which nothing here reads)."""
    quote = connection.ops.quote_name
    meta = Event._meta
    column = {field.name: str(field.column) for field in meta.concrete_fields}
    columns = ", ".join(quote(column[name]) for name in ("session", "seq", "type", "envelope", "created_at"))
    created = connection.ops.adapt_datetimefield_value(now)
    params: list[Any] = []
    for frame in frames:
        params += [frame.session_id, frame.seq, frame.type, frame.envelope, created]
    rows = ", ".join(["(%s, %s, %s, %s, %s)"] * len(frames))
    with connection.cursor() as cursor:
        cursor.execute(f"INSERT INTO {quote(meta.db_table)} ({columns}) VALUES {rows}", params)


def broadcast(session_id: str, type_name: str, properties: dict[str, Any]) -> Frame:
    """Send an ephemeral event (no seq, never replayed) to the session's streams."""
    if is_persisted(type_name):
        raise ValueError(f"{type_name} is persisted: use publish()")
    frame = Frame.make(session_id, type_name, iso(timezone.now()), properties)
    group = groups.session_group(session_id)
    transaction.on_commit(lambda: fanout.send_frame(group, frame))
    return frame


def publish_custom(
    session_id: str, user: Any, type_name: Any, properties: Any, *, body_bytes: int
) -> Frame:
    if body_bytes > settings.TANDEM_MAX_EVENT_BYTES:
        raise PayloadTooLarge(f"An event body may be at most {settings.TANDEM_MAX_EVENT_BYTES} bytes.")
    problem = custom_type_problem(type_name)
    if problem:
        raise ValidationFailed(details={"type": [problem]})
    if not isinstance(properties, dict):
        raise ValidationFailed(details={"properties": ["Must be a JSON object."]})
    if "published_by" in properties:
        raise ValidationFailed(details={"properties": ["'published_by' is set by the server."]})
    try:
        encoded = orjson.dumps(properties)
    except orjson.JSONEncodeError as exc:  # huge integers, lone surrogates, deep nesting
        raise ValidationFailed(details={"properties": [f"Cannot be encoded as JSON: {exc}."]}) from None
    if len(encoded) > settings.TANDEM_MAX_EVENT_BYTES:
        raise PayloadTooLarge(f"An event may be at most {settings.TANDEM_MAX_EVENT_BYTES} bytes.")
    props = {**properties, "published_by": {"id": user.pk, "username": user.get_username()}}
    return publish(session_id, type_name, props)


# ---------------------------------------------------------------- reading


def type_q(type_filter: TypeFilter) -> Q:
    q = Q(type__in=type_filter.exact)
    for prefix in type_filter.prefixes:
        q |= Q(type__startswith=prefix)
    return q


@dataclass(frozen=True)
class History:
    envelopes: list[str]
    last_seq: int
    reset: bool

    def to_json(self) -> bytes:
        # Stored envelopes are already JSON: splice them instead of re-encoding.
        return (
            b'{"events":['
            + ",".join(self.envelopes).encode()
            + b'],"last_seq":%d,"reset":%s}' % (self.last_seq, b"true" if self.reset else b"false")
        )


def history(
    session_id: str, head: int, *, after: int, limit: int, type_filter: TypeFilter | None
) -> History:
    if reset_reason(session_id, head, after) is not None:
        return History([], head, True)
    rows = Event.objects.filter(session_id=session_id, seq__gt=after)
    if type_filter is not None:
        rows = rows.filter(type_q(type_filter))
    envelopes = list(rows.order_by("seq").values_list("envelope", flat=True)[:limit])
    return History(envelopes, head, False)


def reset_reason(session_id: str, head: int, after: int) -> str | None:
    """Why a reader positioned at ``after`` cannot be given what follows, or None."""
    if after > head:
        return "unknown_position"
    if after == head:
        return None
    # Retention always removes the lowest seqs first, so if after+1 is kept, all is.
    if not Event.objects.filter(session_id=session_id, seq=after + 1).exists():
        return "history_expired"
    return None


# No seq reaches this (seqs are 64-bit signed integers in the database).
BEYOND_EVERY_HEAD = 2**63 - 1


def parse_position(raw: str | None, name: str) -> int | None:
    """A position is ASCII digits and nothing else (no sign, space, or ``_``). Any number
    of them is well-formed: one too large for a seq is beyond every head, like any
    position past the head (``stream.reset``/``reset``), never a 400."""
    if raw is None or raw == "":
        return None
    if not raw.isascii() or not raw.isdigit():
        raise BadRequest(f"{name} must be a non-negative integer.", details={name: raw[:40]})
    # Compare by length before converting: int() of thousands of digits is slow, and refused.
    if len(raw.lstrip("0")) > 18:
        return BEYOND_EVERY_HEAD
    return int(raw)


# ---------------------------------------------------------------- fan-out delivery
# (for processes without a server: scripts, management commands)


def flush(timeout: float = 5.0) -> bool:
    """Block until every event this process published so far has been handed to the
    channel layer (True), or ``timeout`` passed (False). Not from the runtime's loop."""
    if runtime.in_main_loop():
        raise RuntimeError("flush() would block the loop that does the sending")
    # runtime.submit runs this after every callback scheduled before it (call_soon is
    # FIFO), so each earlier send is already in the outbox.
    future = runtime.submit(fanout.drained())
    try:
        future.result(timeout)
    except TimeoutError:
        future.cancel()
        return False
    return True


_exit_flush_lock = threading.Lock()
_exit_flush_registered = False


def arrange_exit_flush() -> None:
    """A script's process may end right after publishing, before the runtime thread has
    sent the event on: let the interpreter wait for it at exit."""
    global _exit_flush_registered
    if _exit_flush_registered:
        return
    with _exit_flush_lock:
        if not _exit_flush_registered:
            atexit.register(_flush_at_exit)
            _exit_flush_registered = True


def _flush_at_exit() -> None:
    try:
        if not runtime.in_main_loop() and not flush(5.0):
            log.warning("Exiting before every published event was sent on; readers will "
                        "still find them in the log")
    except Exception:  # never turn an exit into a traceback
        log.debug("Flushing published events at exit failed", exc_info=True)


# ---------------------------------------------------------------- retention


def prune_expired() -> int:
    from events_app import cursors

    cutoff = timezone.now() - timedelta(seconds=settings.TANDEM_EVENT_RETENTION_SECONDS)
    deleted, _ = Event.objects.filter(created_at__lt=cutoff).delete()
    cursors.prune()  # the user-level cursors' snapshots live as long as events
    return deleted


def prune_session(session_id: str) -> int:
    """Apply both retention limits to one session now (the admin's action)."""
    from sessions_app.models import Session

    cutoff = timezone.now() - timedelta(seconds=settings.TANDEM_EVENT_RETENTION_SECONDS)
    head = Session.objects.filter(pk=session_id).values_list("last_seq", flat=True).first() or 0
    old = Q(created_at__lt=cutoff) | Q(seq__lte=head - settings.TANDEM_EVENT_RETENTION_COUNT)
    deleted, _ = Event.objects.filter(Q(session_id=session_id) & old).delete()
    return deleted


async def prune_forever() -> None:
    while True:
        await asyncio.sleep(settings.TANDEM_PRUNE_INTERVAL_SECONDS)
        try:
            await off_loop(prune_expired)()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("Pruning expired events failed")
