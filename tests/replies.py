"""Reading a reply's progress from the persisted event log — exactly what every stream
replays and relays — for tests that drive replies through the REST API."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from events_app.models import Event
from sessions_app.models import Session
from tests.conftest import client_for, wait_until


def log_after(session_id: str, after: int) -> list[dict[str, Any]]:
    rows = Event.objects.filter(session_id=session_id, seq__gt=after).order_by("seq")
    return [orjson.loads(envelope) for envelope in rows.values_list("envelope", flat=True)]


def head(session_id: str) -> int:
    return int(Session.objects.get(pk=session_id).last_seq)


def post(user: Any, session_id: str, *texts: str, if_busy: str | None = None) -> Any:
    body: dict[str, Any] = {"parts": [{"type": "text", "text": t} for t in texts]}
    if if_busy is not None:
        body["if_busy"] = if_busy
    return client_for(user).post(f"/api/sessions/{session_id}/messages/", body, format="json")


def wait_for_completed(session_id: str, after: int, reply_id: str, timeout: float = 10.0) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        for event in log_after(session_id, after):
            if event["type"] == "message.completed" and event["properties"]["message_id"] == reply_id:
                return event
        return None

    return wait_until(done, timeout=timeout)  # type: ignore[no-any-return]


def wait_idle(session_id: str, timeout: float = 10.0) -> None:
    wait_until(lambda: Session.objects.get(pk=session_id).status == {"type": "idle"}, timeout=timeout)


def wait_for_event(
    session_id: str, after: int, type_name: str, match: Callable[[dict[str, Any]], bool] = lambda e: True,
    timeout: float = 10.0,
) -> dict[str, Any]:
    """The first persisted event after ``after`` of ``type_name`` that ``match``es."""

    def found() -> dict[str, Any] | None:
        for event in log_after(session_id, after):
            if event["type"] == type_name and match(event):
                return event
        return None

    return wait_until(found, timeout=timeout)  # type: ignore[no-any-return]
