"""WebSocket commands: parse, check the role, call the same service the REST endpoint
calls, and return the reply frame. Every failure becomes an ``error`` reply."""
from __future__ import annotations

import json
from typing import Any

import orjson
from django.conf import settings
from rest_framework.utils.json import strict_constant

from events_app.services import publish_custom
from events_app.streams import Connection
from project.db import off_loop
from project.errors import (
    ApiError,
    BadRequest,
    InternalError,
    ValidationFailed,
    accept_json_object,
    to_api_error,
)
from project.limits import check_write_rate
from sessions_app import permissions, services
from sessions_app.access import role_in, session_for
from sessions_app.models import Role
from sessions_app.serializers import (
    MessagePostSerializer,
    PermissionReplySerializer,
    permission_data,
    posted_data,
)

COMMANDS = ("ping", "prompt", "abort", "permission.reply", "publish", "presence.update")
_COMMON = {"type", "id", "session_id"}
FIELDS: dict[str, set[str]] = {
    "ping": {"type", "id"},
    "prompt": _COMMON | {"parts", "if_busy"},
    "abort": _COMMON,
    "permission.reply": _COMMON | {"permission_id", "approved", "reason"},
    "publish": _COMMON | {"event"},
    "presence.update": {"type", "id", "state"},
}


def _session_id(conn: Connection, command: dict[str, Any]) -> str:
    if conn.request.session_id is not None:
        return conn.request.session_id
    session_id = command.get("session_id")
    if not isinstance(session_id, str):
        raise ValidationFailed(details={"session_id": ["Required on the user-level stream."]})
    return session_id


def _prompt(user: Any, session_id: str, command: dict[str, Any]) -> dict[str, Any]:
    role_in(user, session_id, Role.EDITOR)
    fields = {k: command[k] for k in ("parts", "if_busy") if k in command}
    serializer = MessagePostSerializer(data={"parts": None, **fields})
    serializer.is_valid(raise_exception=True)
    data = serializer.validated_data
    posted = services.post_message(session_id, user, data["parts"], data["if_busy"])
    return posted_data(posted.message, posted.reply, posted.position, posted.data)


def _abort(user: Any, session_id: str, command: dict[str, Any]) -> dict[str, Any]:
    session, _ = session_for(user, session_id, Role.EDITOR)
    return {"aborted": services.abort(session, user)}


def _publish(user: Any, session_id: str, command: dict[str, Any]) -> dict[str, Any]:
    session, _ = session_for(user, session_id, Role.EDITOR)
    event = command.get("event")
    if not isinstance(event, dict):
        raise ValidationFailed(details={"event": ["Must be an object with 'type' and 'properties'."]})
    unknown = set(event) - {"type", "properties"}
    if unknown:
        raise ValidationFailed(details={k: ["Unknown field."] for k in sorted(unknown)})
    frame = publish_custom(
        session.id, user, event.get("type"), event.get("properties", {}),
        body_bytes=len(orjson.dumps(event)),
    )
    return orjson.loads(frame.envelope)  # type: ignore[no-any-return]


def _permission_reply(user: Any, session_id: str, command: dict[str, Any]) -> dict[str, Any]:
    session, _ = session_for(user, session_id, Role.EDITOR)
    permission_id = command.get("permission_id")
    if not isinstance(permission_id, str):
        raise ValidationFailed(details={"permission_id": ["Must be a string."]})
    fields = {k: command[k] for k in ("approved", "reason") if k in command}
    serializer = PermissionReplySerializer(data=fields)
    serializer.is_valid(raise_exception=True)
    permission = permissions.answer_permission(
        session, permission_id, user,
        approved=serializer.validated_data["approved"], reason=serializer.validated_data["reason"],
    )
    return permission_data(permission)


_SYNC_COMMANDS = {
    "prompt": _prompt,
    "abort": _abort,
    "publish": _publish,
    "permission.reply": _permission_reply,
}


def _write(kind: str, user: Any, session_id: str, command: dict[str, Any]) -> dict[str, Any]:
    # Every write command counts against the same per-user rate as REST writes.
    check_write_rate(user.pk)
    return _SYNC_COMMANDS[kind](user, session_id, command)


def _check_presence(user: Any, session_id: str) -> None:
    session_for(user, session_id)


async def handle(conn: Connection, text: str) -> dict[str, Any] | None:
    """The reply to one client frame, or None for a command without ``id``."""
    command_id: Any = None
    try:
        # Parsed as REST parses a body (DRF's JSONParser, then accept_json_object), not
        # with orjson, which reads an integer beyond 64 bits as a float (1e+300) where
        # REST answers 400.
        try:
            command = json.loads(text, parse_constant=strict_constant)
        except (ValueError, RecursionError):
            raise BadRequest("The frame is not valid JSON.") from None
        if not isinstance(command, dict):
            raise BadRequest("A command must be a JSON object.")
        command_id = command.get("id")
        if command_id is not None and not isinstance(command_id, (str, int)):
            command_id = None
            raise ValidationFailed(details={"id": ["Must be a string or an integer."]})
        if isinstance(command_id, int) and not -(2**63) <= command_id < 2**64:
            command_id = None  # the error reply could not carry it
        accept_json_object(command, "A command")
        kind = command.get("type")
        if kind not in COMMANDS:
            raise BadRequest(f"Unknown command; use one of {', '.join(COMMANDS)}.")
        unknown = set(command) - FIELDS[kind]
        if unknown:
            raise ValidationFailed(details={name: ["Unknown field."] for name in sorted(unknown)})
        if kind == "ping":
            return {"type": "pong", "id": command_id}
        if kind == "presence.update":
            result = await _presence_update(conn, command)
        else:
            session_id = _session_id(conn, command)
            result = await off_loop(_write)(kind, conn.request.user, session_id, command)
    except Exception as exc:
        err = to_api_error(exc) or InternalError()
        if not isinstance(exc, ApiError) and err.status >= 500:
            import logging

            logging.getLogger(__name__).exception("WebSocket command failed")
        return {"type": "error", "id": command_id, "error": {"code": err.code, "message": err.message, "details": err.details}}
    if command_id is None:
        return None
    return {"type": "ack", "id": command_id, "result": result}


async def _presence_update(conn: Connection, command: dict[str, Any]) -> dict[str, Any]:
    if conn.request.session_id is None:
        raise BadRequest("Presence belongs to a session stream.")
    state = command.get("state")
    if not isinstance(state, dict):
        raise ValidationFailed(details={"state": ["Must be a JSON object."]})
    if len(orjson.dumps(state)) > settings.TANDEM_MAX_PRESENCE_BYTES:
        raise ValidationFailed(details={"state": ["At most 4 KiB of JSON."]})
    await off_loop(_check_presence)(conn.request.user, conn.request.session_id)
    await conn.update_presence(state)
    return {"state": state}
