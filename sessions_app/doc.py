"""The shared document of each session (PROTOCOL §10): a Yjs document whose ``Y.Text``
``"doc"`` holds Markdown, stored as Yjs updates (``Document``, ``DocUpdate``).

The service API, for views, the WebSocket, agents, the admin and the CLI. Every function
is synchronous ORM work: from async code call it through ``project.db.off_loop``. A
``session`` is a ``Session`` or its id. Role checks are the caller's: readers need
``session_for(user, id)``, writers ``session_for(user, id, Role.EDITOR)``; the agent
writes as ``AGENT``.

- ``read_doc(session) -> DocState(text, version, updated_at)``: the current text.
- ``apply_edits(actor, session, edits, version=None) -> DocState``: ``edits`` are
  ``Edit(at, delete=0, insert="")`` (or mappings with those keys), applied in order,
  positions in Unicode code points of the text at that moment. Raises
  ``ValidationFailed`` (400) for a position out of range, ``VersionConflict`` (409,
  ``details.version`` the current one) when ``version`` is given and the document has
  moved on, ``DocTooLarge`` (413) past ``TANDEM_MAX_DOC_CHARS``.
- ``append_paragraph(actor, session, text) -> DocState``: ``text`` as a new paragraph at
  the end (a blank line before it unless the document is empty).
- ``apply_update(actor, session, update, origin="") -> Applied | None``: a binary Yjs
  update (v1 encoding) from a client; ``None`` when it changed nothing. Raises
  ``BadUpdate`` (400) for bytes that do not decode, ``DocTooLarge`` (413). Nothing is
  stored, and the document is unchanged, when it raises. ``apply_updates(session,
  [Incoming(actor, update, origin)…])`` does several in one transaction (or statement),
  answering each.
- ``sync_reply(session, state_vector) -> (update, version)``: what a client with that
  state vector lacks (y-websocket's sync step 2). ``BadUpdate`` for a malformed vector.
- ``state_vector(session) -> (state_vector, version)`` (sync step 1) and
  ``brings_news(session, update) -> bool`` (does a reader's sync step 2 hold anything new).
- ``doc_text_and_size(session) -> (text, chars)``: for the admin.
- ``absorb(session_id, version, update)``: a relayed update, into this process's copy.

An agent's edit is ``apply_edits(AGENT, session_id, [Edit(at, delete, insert)])`` or
``append_paragraph(AGENT, session_id, text)`` once its permission is granted: it reaches
every open editor live, and ``doc.updated`` says ``"by": "agent"``.

Every change is stored (one ``DocUpdate`` row and the version bump, in the caller's
transaction) before anything is sent: once it commits, the update goes to the document's
group (``groups.doc_group``) for every process's open editors, and ``doc.updated`` is
published at most once every ``TANDEM_DOC_EVENT_SECONDS`` per session (a change inside
that window is announced when it ends). ``compact_forever`` (every server process's
housekeeping) folds stored updates into the document's base.

Each process keeps the documents it works on in memory (``_slots``), brought up to date
from the stored updates under the document's row lock before each change, so a change
costs the updates made elsewhere since, not a reload of the whole document. While no
other process writes a document, ``apply_updates`` on PostgreSQL skips that locking
transaction: one conditional statement stores a batch if the copy is still current
(``_apply_quickly``).
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from django.conf import settings
from django.contrib.auth.models import User
from django.db import connection, transaction
from django.db.models import F, Q
from django.utils import timezone
from pycrdt import Doc, Text, TransactionEvent

from events_app import fanout, groups
from events_app.services import publish
from project import runtime
from project.db import off_loop
from project.errors import ApiError, BadRequest, PayloadTooLarge, ValidationFailed, VersionConflict
from sessions_app.models import Document, DocUpdate, Session
from sessions_app.serializers import user_data

log = logging.getLogger(__name__)

TEXT_NAME = "doc"
AGENT: Literal["agent"] = "agent"
Actor = User | Literal["agent"]
EMPTY_UPDATE = b"\x00\x00"  # a Yjs v1 update with nothing in it
MAX_LIVE = 256  # documents a process keeps in memory
# Seconds without another process's write after which this process stores a document's
# updates in one conditional statement instead of a locking transaction (apply_updates).
FOREIGN_QUIET = 5.0


class BadUpdate(BadRequest):
    default_message = "The Yjs update does not decode."


class DocTooLarge(PayloadTooLarge):
    default_message = "The document would be longer than the server allows."


@dataclass(frozen=True)
class DocState:
    text: str
    version: int
    updated_at: datetime


@dataclass(frozen=True)
class Edit:
    at: int
    delete: int = 0
    insert: str = ""


@dataclass(frozen=True)
class Applied:
    version: int
    update: bytes  # what the change did to the document (what others need)


# ---------------------------------------------------------------- documents in memory


@dataclass(eq=False)
class _Live:
    doc: Doc[Any]
    text: Text
    version: int
    # False from a change until its transaction commits: a document whose change was
    # rolled back is rebuilt from the database rather than trusted.
    committed: bool = True
    changes: list[bytes] = field(default_factory=list)


@dataclass(eq=False)
class _Slot:
    lock: threading.Lock = field(default_factory=threading.Lock)
    live: _Live | None = None
    # When another process last wrote this document (seen relayed or read back): while
    # it keeps writing, this process's copy is often one behind, so writes take the lock.
    foreign_at: float = -FOREIGN_QUIET


_slots: OrderedDict[str, _Slot] = OrderedDict()
_slots_lock = threading.Lock()


def _slot(session_id: str) -> _Slot:
    with _slots_lock:
        slot = _slots.get(session_id)
        if slot is None:
            slot = _slots[session_id] = _Slot()
        _slots.move_to_end(session_id)
        if len(_slots) > MAX_LIVE:
            for key, old in list(_slots.items())[: len(_slots) - MAX_LIVE]:
                if not old.lock.locked():
                    del _slots[key]
        return slot


def _new_live(version: int) -> _Live:
    doc: Doc[Any] = Doc()
    text = doc.get(TEXT_NAME, type=Text)
    live = _Live(doc, text, version)

    def collect(event: TransactionEvent) -> None:
        live.changes.append(event.update)

    doc.observe(collect)
    return live


def _apply_raw(live: _Live, update: bytes) -> None:
    """Apply ``update``; ``BadUpdate`` if it does not decode (yrs decodes the whole update
    before integrating any of it, so a refused one changes nothing)."""
    try:
        live.doc.apply_update(update)
    except Exception as exc:
        raise BadUpdate(details={"reason": str(exc)[:200]}) from None
    except BaseException as exc:
        # pyo3's PanicException derives from BaseException: a panic in yrs is a bad update,
        # not a reason to stop the thread. The caller drops this document from memory.
        if type(exc).__name__ != "PanicException":
            raise
        raise BadUpdate(details={"reason": "The update could not be applied."}) from None


def _stored(session_id: str, after: int, upto: int) -> list[bytes]:
    rows = DocUpdate.objects.filter(session_id=session_id, version__gt=after, version__lte=upto)
    return [bytes(data) for data in rows.order_by("version").values_list("data", flat=True)]


def _current(slot: _Slot, row: Document) -> _Live:
    """The slot's document brought to ``row.version`` (call with ``slot.lock`` held)."""
    live = slot.live
    if live is None or not live.committed or live.version > row.version:
        live = _new_live(0)
    if live.version < row.version:
        after = live.version
        if row.base_version > after:
            # Updates up to base_version were folded into the base: applying the whole
            # base to a document that has part of it is what Yjs is made for.
            if row.base:
                _apply_raw(live, bytes(row.base))
            after = row.base_version
        for data in _stored(row.session_id, after, row.version):
            _apply_raw(live, data)
        if slot.live is not None:  # behind what is stored: another process wrote
            slot.foreign_at = time.monotonic()
        live.version = row.version
    live.changes.clear()
    slot.live = live
    return live


def absorb(session_id: str, version: int, update: bytes) -> bool:
    """A committed update another process relayed (version ``version``): applied to this
    process's copy of the document when that copy is at the version before it, so the
    next change here need not read it back from the database under the row lock. Never
    waits: when the copy is busy or elsewhere, the next change catches up as usual. True
    if applied."""
    with _slots_lock:
        slot = _slots.get(session_id)
    if slot is None:
        return False
    known = slot.live.version if slot.live is not None else 0
    if version > known:  # not one of ours (those are in the copy before they are sent)
        slot.foreign_at = time.monotonic()
    if not slot.lock.acquire(blocking=False):
        return False
    try:
        live = slot.live
        if live is None or not live.committed or live.version != version - 1:
            return False
        try:
            _apply_raw(live, update)
        except BaseException:
            slot.live = None
            raise
        live.changes.clear()
        live.version = version
        return True
    finally:
        slot.lock.release()


def _take_changes(live: _Live) -> bytes | None:
    changes, live.changes = live.changes, []
    if not changes:
        return None
    if len(changes) == 1:
        return changes[0]
    from pycrdt import merge_updates

    return merge_updates(*changes)


def _sid(session: Session | str) -> str:
    return session if isinstance(session, str) else session.pk


def _lock_row(session_id: str) -> Document:
    """The document's row, locked until the transaction ends; made on first use."""
    # The base (the whole document, once compacted) is read only when a process needs it.
    rows = Document.objects.select_for_update().defer("base")
    row = rows.filter(pk=session_id).first()
    if row is None:
        Document.objects.get_or_create(session_id=session_id)
        row = rows.get(pk=session_id)
    return row


# ---------------------------------------------------------------- reading


def read_doc(session: Session | str) -> DocState:
    session_id = _sid(session)
    row = Document.objects.filter(pk=session_id).first()
    if row is None:
        created = Session.objects.filter(pk=session_id).values_list("created_at", flat=True).first()
        return DocState("", 0, created or timezone.now())
    slot = _slot(session_id)
    with slot.lock:
        try:
            live = _current(slot, row)
        except BaseException:
            slot.live = None
            raise
        return DocState(str(live.text), row.version, row.updated_at)


def doc_text_and_size(session: Session | str) -> tuple[str, int]:
    state = read_doc(session)
    return state.text, len(state.text)


def sync_reply(session: Session | str, state_vector: bytes) -> tuple[bytes, int]:
    """What a client whose state vector is ``state_vector`` lacks, and the version it
    brings it to."""
    session_id = _sid(session)
    row = Document.objects.filter(pk=session_id).first()
    if row is None:
        row = Document(session_id=session_id)
    slot = _slot(session_id)
    with slot.lock:
        try:
            live = _current(slot, row)
        except BaseException:
            slot.live = None
            raise
        try:
            update = live.doc.get_update(state_vector)
        except Exception as exc:
            raise BadUpdate("The state vector does not decode.", details={"reason": str(exc)[:200]}) from None
        return update, row.version


def state_vector(session: Session | str) -> tuple[bytes, int]:
    """The document's Yjs state vector (y-websocket's sync step 1), and its version."""
    session_id = _sid(session)
    row = Document.objects.filter(pk=session_id).first() or Document(session_id=session_id)
    slot = _slot(session_id)
    with slot.lock:
        try:
            live = _current(slot, row)
        except BaseException:
            slot.live = None
            raise
        return live.doc.get_state(), row.version


def brings_news(session: Session | str, update: bytes) -> bool:
    """Whether ``update`` holds insertions the document lacks (for a reader's sync step 2,
    which y-websocket sends even when it has nothing new; a reader may not write, so its
    update is never applied). ``BadUpdate`` if it does not decode."""
    from pycrdt import get_state

    try:
        theirs = _decode_state_vector(get_state(update))
    except Exception as exc:
        raise BadUpdate(details={"reason": str(exc)[:200]}) from None
    ours = _decode_state_vector(state_vector(session)[0])
    return any(clock > ours.get(client, 0) for client, clock in theirs.items())


def _decode_state_vector(data: bytes) -> dict[int, int]:
    def var_uint(pos: int) -> tuple[int, int]:
        value, shift = 0, 0
        while True:
            if pos >= len(data) or shift > 63:
                raise ValueError("truncated state vector")
            byte = data[pos]
            value |= (byte & 0x7F) << shift
            pos += 1
            shift += 7
            if byte < 0x80:
                return value, pos

    count, pos = var_uint(0)
    out: dict[int, int] = {}
    for _ in range(count):
        client, pos = var_uint(pos)
        clock, pos = var_uint(pos)
        out[client] = clock
    return out


def full_state(session: Session | str) -> tuple[bytes, int]:
    """The whole document as one update, and its version."""
    return sync_reply(session, b"\x00")


def updates_between(session: Session | str, after: int, upto: int) -> list[bytes]:
    """The stored updates after version ``after`` up to ``upto``; when some of them were
    compacted, the whole document instead (as one update). For a process that missed a
    relayed update."""
    session_id = _sid(session)
    row = Document.objects.filter(pk=session_id).values_list("base_version", flat=True).first()
    if row is not None and row > after:
        return [full_state(session_id)[0]]
    return _stored(session_id, after, upto)


def doc_version(session: Session | str) -> int:
    found = Document.objects.filter(pk=_sid(session)).values_list("version", flat=True).first()
    return found or 0


def doc_versions(session_ids: list[str]) -> dict[str, int]:
    return dict(Document.objects.filter(pk__in=session_ids).values_list("session_id", "version"))


# ---------------------------------------------------------------- writing


def _too_large(live: _Live, bytes_before: int) -> bool:
    """Whether the text grew past the limit. ``len`` of a ``Text`` counts UTF-8 bytes, at
    least the characters, so the characters are counted only near the limit."""
    limit = settings.TANDEM_MAX_DOC_CHARS
    size = len(live.text)
    return size > limit and size > bytes_before and len(str(live.text)) > limit


def _too_large_error() -> DocTooLarge:
    limit = settings.TANDEM_MAX_DOC_CHARS
    return DocTooLarge(
        f"The document may hold at most {limit} characters.", details={"max_chars": limit}
    )


def apply_update(actor: Actor, session: Session | str, update: bytes, *, origin: str = "") -> Applied | None:
    [result] = apply_updates(session, [Incoming(actor, update, origin)])
    if isinstance(result, BaseException):
        raise result
    return result


@dataclass(frozen=True)
class Incoming:
    """One Yjs update from a client: who sent it, and from which connection."""

    actor: Actor
    update: bytes
    origin: str = ""


def apply_updates(session: Session | str, items: Sequence[Incoming]) -> list[Applied | None | ApiError]:
    """``apply_update`` for several updates of one document in one transaction (one row
    lock, one commit): each gets its own version and its own answer, and a refused one
    (``BadUpdate``, ``DocTooLarge``, returned in its place) does not stop the others."""
    session_id = _sid(session)
    slot = _slot(session_id)
    quick = _apply_quickly(session_id, slot, items)
    if quick is not None:
        return quick
    results: list[Applied | None | ApiError] = []
    with transaction.atomic():
        row = _lock_row(session_id)
        with slot.lock:
            try:
                live = _current(slot, row)
                stored: list[tuple[bytes, Actor, str]] = []
                for item in items:
                    if item.update == EMPTY_UPDATE:
                        results.append(None)
                        continue
                    before = len(live.text)
                    try:
                        # yrs decodes the whole update before applying any of it: a refused
                        # one has changed nothing.
                        _apply_raw(live, item.update)
                    except BadUpdate as exc:
                        live.changes.clear()
                        results.append(exc)
                        continue
                    change = _take_changes(live)
                    if change is None:
                        results.append(None)  # known already, or waiting for one it needs
                    elif _too_large(live, before):
                        results.append(_too_large_error())
                        # It is in memory now: rebuild from what is stored, this
                        # transaction's changes included.
                        _record(row, stored, live)
                        stored = []
                        slot.live = None
                        live = _current(slot, row)
                        live.committed = False
                    else:
                        stored.append((change, item.actor, item.origin))
                        results.append(Applied(row.version + len(stored), change))
                _record(row, stored, live)
            except BaseException:
                slot.live = None  # it may hold what was refused: rebuilt on next use
                raise
    return results


def _apply_quickly(session_id: str, slot: _Slot, items: Sequence[Incoming]) -> list[Applied | None | ApiError] | None:
    """``apply_updates`` in one statement, when this process's copy of the document is
    (very likely) current: no other process wrote it for ``FOREIGN_QUIET`` seconds. The
    changes are computed on the copy first, then stored by one PostgreSQL statement in
    autocommit (its own transaction): bump the row's version *if it is still the copy's*
    and insert the changes as the versions after it. The row is locked for that one
    statement's execution and commit, not for a transaction's worth of round trips
    (BEGIN, SELECT … FOR UPDATE, INSERT, UPDATE, COMMIT). Contiguous versions and "stored
    before relayed" hold as on the locking path. None when it does not apply (another
    process wrote meanwhile, an update makes the text too long, not PostgreSQL): the
    caller takes the locking path, on a copy rebuilt from the database."""
    if connection.vendor != "postgresql" or connection.in_atomic_block:
        return None
    if time.monotonic() - slot.foreign_at < FOREIGN_QUIET:
        return None
    with slot.lock:
        live = slot.live
        if live is None or not live.committed:
            return None
        known = live.version
        results: list[Applied | None | ApiError] = []
        stored: list[tuple[bytes, Actor]] = []
        try:
            for item in items:
                if item.update == EMPTY_UPDATE:
                    results.append(None)
                    continue
                before = len(live.text)
                try:
                    _apply_raw(live, item.update)
                except BadUpdate as exc:
                    live.changes.clear()
                    results.append(exc)
                    continue
                change = _take_changes(live)
                if change is None:
                    results.append(None)
                elif _too_large(live, before):
                    slot.live = None  # the locking path refuses it, on a rebuilt copy
                    return None
                else:
                    stored.append((change, item.actor))
                    results.append(Applied(known + len(stored), change))
            if not stored:
                return results
            live.committed = False
            event_at = _store_if_at(session_id, known, stored)
        except BaseException:
            slot.live = None
            raise
        if event_at is False:  # another process wrote since the copy was current
            log.info("Document %s: another process wrote meanwhile; storing under the lock", session_id)
            slot.live = None
            slot.foreign_at = time.monotonic()
            return None
        live.version = known + len(stored)
        live.committed = True
    # Committed: relayed in order, then doc.updated as the coalescing allows (in its own
    # transaction; the locking path publishes it in the storing one).
    group = groups.doc_group(session_id)
    origins = [item.origin for item, result in zip(items, results, strict=True) if isinstance(result, Applied)]
    for (change, _), origin, version in zip(stored, origins, range(known + 1, known + len(stored) + 1), strict=True):
        fanout.send_to_group(group, groups.encode_doc_update(session_id, version, change, origin))
    interval = settings.TANDEM_DOC_EVENT_SECONDS
    if event_at is None or (timezone.now() - event_at).total_seconds() >= interval:
        left = announce_if_due(session_id)
    else:
        left = interval - (timezone.now() - event_at).total_seconds()
    if left is not None:
        _announce_later(session_id, left)
    return results


_STORE_IF_AT = """
WITH d AS (
    UPDATE {doc} SET version = version + %(n)s, updated_at = %(now)s, last_by_id = %(by)s,
        last_by_agent = %(agent)s
    WHERE session_id = %(sid)s AND version = %(known)s
    RETURNING event_at
), ins AS (
    INSERT INTO {upd} (session_id, version, data, created_at)
    SELECT %(sid)s, %(known)s + u.k, u.data, %(now)s
    FROM d, unnest(%(data)s::bytea[]) WITH ORDINALITY AS u(data, k)
)
SELECT event_at FROM d
"""


def _store_if_at(session_id: str, known: int, stored: list[tuple[bytes, Actor]]) -> datetime | None | Literal[False]:
    """Store ``stored`` as the versions after ``known`` if the document is still at
    ``known`` (one statement, committed when it returns): the row's ``event_at``, or False
    if the document is elsewhere (nothing stored)."""
    actor = stored[-1][1]
    sql = _STORE_IF_AT.format(doc=Document._meta.db_table, upd=DocUpdate._meta.db_table)
    params: dict[str, Any] = {
        "n": len(stored), "now": timezone.now(), "by": None if isinstance(actor, str) else actor.pk,
        "agent": isinstance(actor, str), "sid": session_id, "known": known,
        "data": [change for change, _ in stored],
    }
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        row = cursor.fetchone()
    if row is None:
        return False
    event_at: datetime | None = row[0]
    return event_at


def _edit_fields(edit: Edit | Mapping[str, Any]) -> Edit:
    if isinstance(edit, Edit):
        return edit
    return Edit(int(edit["at"]), int(edit.get("delete") or 0), str(edit.get("insert") or ""))


def apply_edits(
    actor: Actor,
    session: Session | str,
    edits: Sequence[Edit | Mapping[str, Any]],
    version: int | None = None,
    *,
    origin: str = "",
) -> DocState:
    session_id = _sid(session)
    wanted = [_edit_fields(e) for e in edits]
    for i, edit in enumerate(wanted):
        if edit.at < 0 or edit.delete < 0:
            raise ValidationFailed(details={"edits": [f"Edit {i}: positions and lengths are at least 0."]})
        try:
            edit.insert.encode("utf-8")
        except UnicodeEncodeError:
            raise ValidationFailed(details={"edits": [f"Edit {i}: insert must be valid Unicode text."]}) from None
    slot = _slot(session_id)
    with transaction.atomic():
        row = _lock_row(session_id)
        if version is not None and version != row.version:
            raise VersionConflict(details={"version": row.version})
        with slot.lock:
            try:
                live = _current(slot, row)
                before = str(live.text)
                # Checked on a copy first, so a refused request leaves the document alone.
                text, steps = before, []
                for i, edit in enumerate(wanted):
                    if edit.at > len(text) or edit.at + edit.delete > len(text):
                        raise ValidationFailed(
                            f"Edit {i} reaches past the end of the text.",
                            details={"edits": [
                                f"Edit {i}: at {edit.at}, delete {edit.delete}; the text has "
                                f"{len(text)} characters then."
                            ]},
                        )
                    start = len(text[: edit.at].encode("utf-8"))
                    length = len(text[edit.at : edit.at + edit.delete].encode("utf-8"))
                    steps.append((start, length, edit.insert))
                    text = text[: edit.at] + edit.insert + text[edit.at + edit.delete :]
                limit = settings.TANDEM_MAX_DOC_CHARS
                if len(text) > limit and len(text) > len(before):
                    raise _too_large_error()
                with live.doc.transaction():
                    for start, length, insert in steps:
                        if length:
                            del live.text[start : start + length]
                        if insert:
                            live.text.insert(start, insert)
                change = _take_changes(live)
                if change is None:
                    return DocState(before, row.version, row.updated_at)
                new_version = _store(row, change, actor, origin, live)
            except BaseException:
                slot.live = None
                raise
    return DocState(text, new_version, row.updated_at)


def _paragraph_break(text: str) -> str:
    if not text.strip() or text.endswith("\n\n"):
        return ""
    return "\n" if text.endswith("\n") else "\n\n"


def append_paragraph(actor: Actor, session: Session | str, text: str) -> DocState:
    """``text`` as a new paragraph at the end of the document."""
    session_id = _sid(session)
    current = read_doc(session_id)
    for _ in range(5):
        body = current.text
        sep = _paragraph_break(body)
        try:
            return apply_edits(actor, session_id, [Edit(len(body), 0, sep + text)], current.version)
        except VersionConflict:
            current = read_doc(session_id)
    return apply_edits(actor, session_id, [Edit(len(current.text), 0, "\n\n" + text)])


def _store(row: Document, change: bytes, actor: Actor, origin: str, live: _Live) -> int:
    _record(row, [(change, actor, origin)], live)
    return row.version


def _record(row: Document, changes: list[tuple[bytes, Actor, str]], live: _Live) -> None:
    """Store ``changes`` as the next versions (inside the caller's transaction, with the
    row locked: one INSERT and one UPDATE however many), announce them as the coalescing
    allows, and send each to every process's editors once the transaction commits."""
    if not changes:
        return
    now = timezone.now()
    first = row.version + 1
    row.version += len(changes)
    row.updated_at = now
    actor = changes[-1][1]
    row.last_by = None if isinstance(actor, str) else actor
    row.last_by_agent = isinstance(actor, str)
    DocUpdate.objects.bulk_create([
        DocUpdate(session_id=row.session_id, version=version, data=change, created_at=now)
        for version, (change, _, _) in enumerate(changes, start=first)
    ])
    fields = ["version", "updated_at", "last_by", "last_by_agent"]
    interval = settings.TANDEM_DOC_EVENT_SECONDS
    trailing: float | None = None
    if row.event_at is None or (now - row.event_at).total_seconds() >= interval:
        _announce(row, now)
        fields += ["event_version", "event_at"]
    else:
        trailing = interval - (now - row.event_at).total_seconds()
    row.save(update_fields=fields)
    live.version = row.version
    live.committed = False
    session_id = row.session_id
    messages = [
        groups.encode_doc_update(session_id, version, change, origin)
        for version, (change, _, origin) in enumerate(changes, start=first)
    ]

    def committed() -> None:
        live.committed = True
        group = groups.doc_group(session_id)
        for message in messages:
            fanout.send_to_group(group, message)
        if trailing is not None:
            _announce_later(session_id, trailing)

    transaction.on_commit(committed)


def _announce(row: Document, now: datetime) -> None:
    # None when the author's account is gone.
    by: dict[str, Any] | str | None = AGENT if row.last_by_agent else user_data(row.last_by)
    publish(row.session_id, "doc.updated", {"version": row.version, "by": by})
    row.event_version = row.version
    row.event_at = now


# ---------------------------------------------------------------- coalesced doc.updated

_pending_events: set[str] = set()
_pending_lock = threading.Lock()


def _announce_later(session_id: str, delay: float) -> None:
    """The change just stored fell inside the coalescing window: announce it when the
    window ends (once per session and window in this process; the compaction sweep
    announces what a process that died could not)."""
    with _pending_lock:
        if session_id in _pending_events:
            return
        _pending_events.add(session_id)

    def fire() -> None:
        runtime.submit(_announce_pending(session_id))

    runtime.call_soon(_schedule, max(0.0, delay) + 0.01, fire)


def _schedule(delay: float, callback: Any) -> None:
    asyncio.get_running_loop().call_later(delay, callback)


async def _announce_pending(session_id: str) -> None:
    with _pending_lock:
        _pending_events.discard(session_id)
    retry = await off_loop(announce_if_due)(session_id)
    if retry is not None:
        _announce_later(session_id, retry)


def announce_if_due(session_id: str) -> float | None:
    """Publish ``doc.updated`` for changes not announced yet, if the window allows; else
    the seconds left until it does."""
    interval = settings.TANDEM_DOC_EVENT_SECONDS
    with transaction.atomic():
        row = Document.objects.select_for_update().filter(pk=session_id).first()
        if row is None or row.version <= row.event_version:
            return None
        now = timezone.now()
        if row.event_at is not None:
            left = interval - (now - row.event_at).total_seconds()
            if left > 0:
                return left
        _announce(row, now)
        row.save(update_fields=["event_version", "event_at"])
    return None


# ---------------------------------------------------------------- compaction


def compact(session: Session | str) -> bool:
    """Fold the document's stored updates into its base. True if there was work."""
    session_id = _sid(session)
    skip = bool(connection.features.has_select_for_update_skip_locked)
    with transaction.atomic():
        # Another process compacting it already: leave it to that one.
        row = Document.objects.select_for_update(skip_locked=skip).filter(pk=session_id).first()
        if row is None or row.version <= row.base_version:
            return False
        doc: Doc[Any] = Doc()
        doc.get(TEXT_NAME, type=Text)
        if row.base:
            doc.apply_update(bytes(row.base))
        for data in _stored(session_id, row.base_version, row.version):
            doc.apply_update(data)
        row.base = doc.get_update()
        row.base_version = row.version
        row.save(update_fields=["base", "base_version"])
        DocUpdate.objects.filter(session_id=session_id, version__lte=row.version).delete()
    return True


COMPACT_IDLE_SECONDS = 30.0  # a document with fewer updates is compacted once it rests


def housekeeping() -> tuple[int, int]:
    """One sweep: compact the documents that are due, announce changes whose trailing
    ``doc.updated`` was lost (the process that owed it died). (compacted, announced)."""
    now = timezone.now()
    due = Document.objects.filter(
        Q(version__gte=F("base_version") + settings.TANDEM_DOC_COMPACT_UPDATES)
        | Q(version__gt=F("base_version"), updated_at__lt=now - timedelta(seconds=COMPACT_IDLE_SECONDS))
    ).values_list("session_id", flat=True)[:100]
    compacted = sum(1 for session_id in list(due) if compact(session_id))
    late = now - timedelta(seconds=settings.TANDEM_DOC_EVENT_SECONDS + 5.0)
    owed = Document.objects.filter(version__gt=F("event_version"), updated_at__lt=late).values_list(
        "session_id", flat=True
    )[:100]
    announced = 0
    for session_id in list(owed):
        if announce_if_due(session_id) is None:
            announced += 1
    return compacted, announced


async def compact_forever() -> None:
    while True:
        await asyncio.sleep(settings.TANDEM_DOC_COMPACT_SECONDS)
        try:
            await off_loop(housekeeping)()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("Compacting shared documents failed")
