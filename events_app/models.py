"""The per-session event log. Each row keeps the exact envelope JSON that went out on
the wire, so replay and history write stored bytes instead of re-encoding them."""
from __future__ import annotations

from django.db import models


class Event(models.Model):
    # Led by the one_event_per_seq constraint's index: no index of its own.
    session = models.ForeignKey(
        "sessions_app.Session", on_delete=models.CASCADE, related_name="events", db_index=False
    )
    seq = models.BigIntegerField()
    type = models.CharField(max_length=64)
    envelope = models.TextField()
    created_at = models.DateTimeField(db_index=True)

    class Meta:
        ordering = ["session", "seq"]
        constraints = [
            models.UniqueConstraint(fields=["session", "seq"], name="one_event_per_seq")
        ]

    def __str__(self) -> str:
        return f"{self.session_id}#{self.seq} {self.type}"


class CursorSnapshot(models.Model):
    """The positions of a user-level stream at one moment, so its cursor can name them in
    a few bytes whatever the number of sessions (docs/API.md, "The user-level stream").
    ``positions`` is the JSON list ``[[session_id, seq], ...]``; a cursor refers to a
    session by its index in that list. Written before any cursor naming it is sent;
    deleted after ``TANDEM_EVENT_RETENTION_SECONDS``."""

    id = models.CharField(primary_key=True, max_length=16)
    user_id = models.BigIntegerField()
    positions = models.TextField()
    created_at = models.DateTimeField(db_index=True)

    def __str__(self) -> str:
        return f"{self.id} (user {self.user_id})"
