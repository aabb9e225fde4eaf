"""Publish a custom event into a session from any process: a script, a management
command, a Celery task. Plain synchronous code, no event loop of your own needed::

    django.setup()
    from events_app.publishing import publish_event
    envelope = publish_event(session_id, "task.progress", {"done": 3}, as_user="build-bot")

The checks and errors (``project.errors``) are the REST publish endpoint's; ``as_user``
must be an editor or owner (a non-member gets NotFound, a viewer PermissionDenied). Streams
get the event after the commit; a process that exits at once waits (≤5 s) for that send.
"""
from __future__ import annotations

import json
import logging
from typing import Any

import orjson
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import User

from events_app.services import arrange_exit_flush, flush, publish_custom
from events_app.types import Frame
from project.errors import (
    BadRequest,
    NotFound,
    PayloadTooLarge,
    ValidationFailed,
    accept_json_object,
    to_api_error,
)
from sessions_app.access import session_for
from sessions_app.models import Role

__all__ = ["publish_event", "publish_json", "flush", "resolve_user"]

log = logging.getLogger(__name__)


def publish_event(
    session_id: str,
    type: str,  # noqa: A002 - the event's field name
    properties: dict[str, Any] | None = None,
    *,
    as_user: str | User,
) -> dict[str, Any]:
    """Publish ``{"type": type, "properties": properties}`` into the session on behalf of
    ``as_user`` (a username or a user) and return the event's envelope as a dict."""
    user = resolve_user(as_user)
    event = {"type": type, "properties": {} if properties is None else properties}
    session, _ = session_for(user, session_id, Role.EDITOR)
    frame = _publish_checked(user, session.id, event, body_bytes=None)
    arrange_exit_flush()
    return orjson.loads(frame.envelope)  # type: ignore[no-any-return]


def publish_json(
    session_id: str,
    body: bytes | str,
    *,
    as_user: str | User,
    require_properties: bool = False,
) -> dict[str, Any]:
    """Publish a raw JSON body ``{"type", "properties"}`` exactly as the REST endpoint
    would receive it: size, JSON syntax, shape and event checks in the endpoint's order.
    ``require_properties`` also refuses a body without ``properties`` (REST defaults it
    to ``{}``); the bridges use it. This is what a pub/sub or Kafka bridge calls."""
    raw = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
    if len(raw) > settings.TANDEM_MAX_EVENT_BYTES:
        # The REST endpoint answers 413 for such a body before reading it.
        raise PayloadTooLarge(f"An event body may be at most {settings.TANDEM_MAX_EVENT_BYTES} bytes.")
    user = resolve_user(as_user)
    session, _ = session_for(user, session_id, Role.EDITOR)
    event = parse_body(raw)
    if require_properties and "properties" not in event:
        raise ValidationFailed(details={"properties": ["This field is required."]})
    frame = _publish_checked(user, session.id, event, body_bytes=len(raw))
    arrange_exit_flush()
    return orjson.loads(frame.envelope)  # type: ignore[no-any-return]


def resolve_user(as_user: str | User) -> User:
    """The active user named (or given) by ``as_user``; NotFound otherwise."""
    if isinstance(as_user, str):
        model = get_user_model()
        user = model.objects.filter(**{model.USERNAME_FIELD: as_user}).first() if as_user else None
        name = as_user
    else:
        user, name = as_user, as_user.get_username()
    if user is None or not user.is_active:
        raise NotFound(f"No active user named {name!r}.")
    return user


def parse_body(raw: bytes) -> dict[str, Any]:
    """What ``project.errors.StrictJSONParser`` does to a request body: UTF-8 JSON, an
    object, nothing that cannot be stored or sent on (lone surrogates, huge integers,
    absurd nesting)."""
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except RecursionError:
        raise BadRequest("The request body is nested too deeply.") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, NaN/Infinity
        raise BadRequest(f"JSON parse error - {exc}") from None
    return accept_json_object(data)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"Out of range float values are not JSON compliant: {name!r}")


def _publish_checked(
    user: User, session_id: str, event: dict[str, Any], *, body_bytes: int | None
) -> Frame:
    """The REST endpoint's serializer, then ``publish_custom``."""
    from rest_framework.exceptions import ValidationError

    from sessions_app.serializers import EventPublishSerializer

    serializer = EventPublishSerializer(data=event)
    try:
        serializer.is_valid(raise_exception=True)
    except ValidationError as exc:
        raise to_api_error(exc) from None  # type: ignore[misc]
    data = serializer.validated_data
    if body_bytes is None:
        try:
            body_bytes = len(orjson.dumps({"type": data["type"], "properties": data["properties"]}))
        except orjson.JSONEncodeError as exc:
            raise ValidationFailed(
                details={"properties": [f"Cannot be encoded as JSON: {exc}."]}
            ) from None
    return publish_custom(session_id, user, data["type"], data["properties"], body_bytes=body_bytes)
