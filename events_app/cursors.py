"""The user-level stream's cursor: the position in every session of the caller, in at
most ``CURSOR_MAX`` bytes however many sessions there are.

A cursor is ``s<snapshot id>`` followed by ``.<index>-<seq>`` entries (hex). The snapshot
(a ``CursorSnapshot`` row) holds the positions of every followed session at one moment;
an entry overrides the position of the session at that index of the snapshot's list. A
connection keeps adding entries as sessions advance; when the next cursor would not fit,
or a session is not in the snapshot, it writes a new snapshot of its current positions
(before any frame naming it is sent) and starts again with no entries.

The positions are the per-session seqs the client has, so a resume is exact however
events of different sessions interleaved or committed: no global order (such as the
event's primary key, which on PostgreSQL can commit out of order) is assumed.
"""
from __future__ import annotations

import base64
import binascii
import re
import secrets
import time
from dataclasses import dataclass
from datetime import timedelta

import orjson
from django.conf import settings
from django.utils import timezone

from events_app.models import CursorSnapshot
from project.errors import BadRequest

CURSOR_MAX = 256
_CURSOR_RE = re.compile(r"s([A-Za-z0-9_-]{16})((?:\.[0-9a-f]{1,8}-[0-9a-f]{1,15})*)")


@dataclass(frozen=True)
class Snapshot:
    id: str
    index: dict[str, int]  # session id -> its index in the snapshot's list
    seqs: list[int]
    created: float  # time.time()


@dataclass(frozen=True)
class Resume:
    positions: dict[str, int]
    known: bool  # False: well-formed, but its snapshot is gone, or not the caller's
    snapshot: Snapshot | None = None


def _bad() -> BadRequest:
    return BadRequest("The cursor is not valid.")


def decode(raw: str, user_id: int) -> Resume:
    """The positions a cursor names. Synchronous (one query): call off the loop."""
    if raw.startswith("ey"):
        return Resume(_decode_legacy(raw), True)
    match = _CURSOR_RE.fullmatch(raw) if len(raw) <= CURSOR_MAX else None
    if match is None:
        raise _bad()
    row = (
        CursorSnapshot.objects.filter(pk=match[1], user_id=user_id)
        .values_list("positions", "created_at").first()
    )
    if row is None:
        return Resume({}, False)
    pairs: list[list[str | int]] = orjson.loads(row[0])
    snapshot = Snapshot(
        match[1], {str(p[0]): i for i, p in enumerate(pairs)}, [int(p[1]) for p in pairs],
        row[1].timestamp(),
    )
    positions = {str(sid): int(seq) for sid, seq in pairs}
    for entry in match[2].split(".")[1:]:
        index, seq = (int(part, 16) for part in entry.split("-"))
        if index >= len(pairs):
            return Resume({}, False)  # not a cursor this server made
        positions[str(pairs[index][0])] = seq
    return Resume(positions, True, snapshot)


def _decode_legacy(raw: str) -> dict[str, int]:
    """Cursors from before snapshots: the whole position map, base64url JSON. Still read,
    so a client holding one across an upgrade resumes; never written."""
    try:
        padded = raw + "=" * (-len(raw) % 4)
        data = orjson.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
    except (ValueError, binascii.Error, UnicodeEncodeError, orjson.JSONDecodeError):
        raise _bad() from None
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63
        for k, v in data.items()
    ):
        raise _bad()
    return data


def save(snapshots: list[CursorSnapshot]) -> None:
    CursorSnapshot.objects.bulk_create(snapshots)


def prune() -> int:
    cutoff = timezone.now() - timedelta(seconds=settings.TANDEM_EVENT_RETENTION_SECONDS)
    deleted, _ = CursorSnapshot.objects.filter(created_at__lt=cutoff).delete()
    return deleted


class CursorTracker:
    """One user-level connection's cursor. ``advance`` runs for every persisted frame and
    ``cursor`` for every one sent: both are a few dict and string operations, bounded by
    ``CURSOR_MAX``, never a walk over every session."""

    __slots__ = ("user_id", "prefix", "index", "entries", "stale", "pending", "created")

    def __init__(self, user_id: int) -> None:
        self.user_id = user_id
        self.prefix = ""
        self.index: dict[str, int] = {}
        self.entries: dict[int, str] = {}
        self.stale = True
        self.pending: list[CursorSnapshot] = []
        self.created = 0.0

    def start(self, positions: dict[str, int], snapshot: Snapshot | None) -> None:
        """Continue from the snapshot the client resumed from when the positions can
        still be said with it (a reconnect writes nothing), else start a new one."""
        self.stale = True
        if snapshot is None or self.too_old(snapshot.created):
            return
        entries: dict[int, str] = {}
        for sid, seq in positions.items():
            index = snapshot.index.get(sid)
            if index is None:
                return
            if seq != snapshot.seqs[index]:
                entries[index] = f".{index:x}-{seq:x}"
        self.prefix, self.index, self.entries = f"s{snapshot.id}", snapshot.index, entries
        self.created, self.stale = snapshot.created, False

    def advance(self, session_id: str, seq: int) -> None:
        index = self.index.get(session_id)
        if index is None:
            self.stale = True  # joined since the snapshot
        else:
            self.entries[index] = f".{index:x}-{seq:x}"

    def cursor(self, positions: dict[str, int]) -> str:
        if not self.stale:
            cursor = self.prefix + "".join(self.entries.values())
            if len(cursor) <= CURSOR_MAX:
                return cursor
        return self._snapshot(positions)

    def too_old(self, created: float | None = None) -> bool:
        """Snapshots are deleted after the event retention time: stop naming one well
        before, so the cursors a client holds stay resumable."""
        age = time.time() - (self.created if created is None else created)
        return age > settings.TANDEM_EVENT_RETENTION_SECONDS / 2

    def _snapshot(self, positions: dict[str, int]) -> str:
        snapshot_id = secrets.token_urlsafe(12)
        pairs = list(positions.items())
        self.pending.append(CursorSnapshot(
            id=snapshot_id, user_id=self.user_id, positions=orjson.dumps(pairs).decode(),
            created_at=timezone.now(),
        ))
        self.prefix, self.index, self.entries = f"s{snapshot_id}", {s: i for i, (s, _) in enumerate(pairs)}, {}
        self.created, self.stale = time.time(), False
        return self.prefix

    def take_pending(self) -> list[CursorSnapshot]:
        pending, self.pending = self.pending, []
        return pending
