"""Reading a session's log back: what a stream replays and the hub fills a gap with.
Below the outbox and the hub (``fanout``), which read through it, and below ``services``,
which sends through them."""
from __future__ import annotations

from events_app.models import Event
from events_app.types import Frame


def events_between(session_id: str, after: int, upto: int, limit: int = 500) -> list[Frame]:
    rows = (
        Event.objects.filter(session_id=session_id, seq__gt=after, seq__lte=upto)
        .order_by("seq")
        .values_list("seq", "type", "envelope")[:limit]
    )
    return [Frame(seq, session_id, t, env) for seq, t, env in rows]
