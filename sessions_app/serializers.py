"""Input validation (DRF serializers that refuse unknown fields) and the one JSON shape
of each resource, shared by REST responses and event properties."""
from __future__ import annotations

from typing import Any

from django.contrib.auth.models import User
from django.contrib.auth.validators import UnicodeUsernameValidator
from rest_framework import serializers

from events_app.types import iso
from sessions_app.models import Message, Part, PermissionRequest, Role, Session


class StrictSerializer(serializers.Serializer):  # type: ignore[type-arg]
    """Unknown fields are an error, so a typo never silently does nothing."""

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(self.fields))
            if unknown:
                raise serializers.ValidationError({name: ["Unknown field."] for name in unknown})
        return super().to_internal_value(data)


class StrictCharField(serializers.CharField):
    """A JSON string only: numbers are not silently turned into text, and lone UTF-16
    surrogates (valid JSON escapes, but not storable text) are refused with a 400."""

    default_error_messages = {
        "not_a_string": "Must be a string.",
        "surrogate": "Must be valid Unicode text (no lone surrogates).",
    }

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("not_a_string")
        try:
            data.encode("utf-8")
        except UnicodeEncodeError:
            self.fail("surrogate")
        return super().to_internal_value(data)


class CredentialsSerializer(StrictSerializer):
    # The shape and, for the OpenAPI description, the limits; services.create_user applies
    # the same rules (and the rest) to the API and the sign-up page alike.
    username = StrictCharField(max_length=150, trim_whitespace=False, validators=[UnicodeUsernameValidator()])
    password = StrictCharField(max_length=4096, trim_whitespace=False)


class SessionCreateSerializer(StrictSerializer):
    title = StrictCharField(max_length=200, required=False, allow_blank=True, default="")
    agent = StrictCharField(max_length=32, required=False, default="echo")

    def validate_agent(self, value: str) -> str:
        from sessions_app.agents import registry

        if value not in registry.names():
            raise serializers.ValidationError(f"Unknown agent; choose one of {registry.names()}.")
        return value


class SessionUpdateSerializer(StrictSerializer):
    title = StrictCharField(max_length=200, allow_blank=True)


class MemberAddSerializer(StrictSerializer):
    username = StrictCharField(max_length=150)
    role = serializers.ChoiceField(choices=[Role.EDITOR, Role.VIEWER])


class TextPartSerializer(StrictSerializer):
    type = serializers.ChoiceField(choices=["text"])
    # Kept exactly as sent (leading spaces and newlines can matter), but a text of only
    # whitespace is as blank as "".
    text = StrictCharField(allow_blank=False, trim_whitespace=False)

    def validate_text(self, value: str) -> str:
        if not value.strip():
            raise serializers.ValidationError(self.fields["text"].error_messages["blank"], code="blank")
        return value


class MessagePostSerializer(StrictSerializer):
    parts: serializers.ListSerializer[dict[str, str]] = serializers.ListSerializer(
        child=TextPartSerializer(), allow_empty=False, max_length=64
    )


class EventPublishSerializer(StrictSerializer):
    type = StrictCharField(max_length=200, trim_whitespace=False)  # names are exact
    properties = serializers.DictField(required=False, default=dict)


# ---------------------------------------------------------------- output shapes


def user_data(user: User | None) -> dict[str, Any] | None:
    if user is None:
        return None
    return {"id": user.pk, "username": user.get_username()}


def session_data(session: Session, role: str | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": session.id,
        "title": session.title,
        "agent": session.agent,
        "status": session.status,
        "owner": user_data(session.owner),
        "last_seq": session.last_seq,
        "created_at": iso(session.created_at),
        "updated_at": iso(session.updated_at),
    }
    if role is not None:
        data["role"] = role
    return data


def part_data(part: Part) -> dict[str, Any]:
    data: dict[str, Any] = {"id": part.id, "type": part.type}
    if part.type == Part.PartType.TOOL:
        data.update({"tool": part.tool, "call_id": part.call_id, "state": part.state or {}})
    else:
        data["text"] = part.text
    return data


def message_data(message: Message, parts: list[Part] | None = None) -> dict[str, Any]:
    if parts is None:
        parts = list(message.parts.all())
    data: dict[str, Any] = {
        "id": message.id,
        "session_id": message.session_id,
        "role": message.role,
        "author": user_data(message.author),
        "status": message.status,
        "created_at": iso(message.created_at),
        "completed_at": iso(message.completed_at) if message.completed_at else None,
        "parts": [part_data(p) for p in parts],
    }
    if message.error:
        data["error"] = message.error
    if message.usage:
        data["usage"] = message.usage
    return data


def resolver_data(permission: PermissionRequest) -> dict[str, Any] | str | None:
    if permission.resolved_by_timeout:
        return "timeout"
    return user_data(permission.resolved_by)


def permission_data(permission: PermissionRequest) -> dict[str, Any]:
    return {
        "id": permission.id,
        "session_id": permission.session_id,
        "message_id": permission.message_id,
        "call_id": permission.call_id,
        "tool": permission.tool,
        "input": permission.input,
        "status": permission.status,
        "created_at": iso(permission.created_at),
        "expires_at": iso(permission.expires_at),
        "resolved_by": resolver_data(permission),
        "approved": permission.approved,
        "reason": permission.reason,
    }


class PermissionReplySerializer(StrictSerializer):
    approved = serializers.BooleanField()
    reason = StrictCharField(max_length=2000, required=False, allow_blank=True, allow_null=True, default=None)

    def to_internal_value(self, data: Any) -> Any:
        # DRF's BooleanField also takes "yes", 1 and "true"; the contract says a boolean.
        if isinstance(data, dict) and "approved" in data and not isinstance(data["approved"], bool):
            raise serializers.ValidationError({"approved": ["Must be true or false."]})
        return super().to_internal_value(data)


class PermissionListQuerySerializer(StrictSerializer):
    status = serializers.ChoiceField(choices=PermissionRequest.Status.choices, required=False)
