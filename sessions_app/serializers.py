"""Input validation (DRF serializers that refuse unknown fields) and the one JSON shape
of each resource (output serializers), shared by REST responses, event properties and
the OpenAPI document."""
from __future__ import annotations

from typing import Any

from django.contrib.auth.models import User
from django.contrib.auth.validators import UnicodeUsernameValidator
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from events_app.types import (
    ANY,
    CUSTOM_TYPE,
    ID,
    RESERVED_PREFIXES,
    TIME,
    TOOL_STATUS,
    TRANSPORT,
    iso,
    one_of,
    ref,
)
from sessions_app.models import Membership, Message, Part, PermissionRequest, Role, Session


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


IF_BUSY = ("queue", "reject", "interrupt")


class MessagePostSerializer(StrictSerializer):
    parts: serializers.ListSerializer[dict[str, str]] = serializers.ListSerializer(
        child=TextPartSerializer(), allow_empty=False, max_length=64
    )
    if_busy = serializers.ChoiceField(
        choices=IF_BUSY, required=False, default="queue",
        help_text="While a reply runs: `queue` the message (default), `reject` it (409 "
        "`session_busy`), or `interrupt` the reply and answer this message next.",
    )


@extend_schema_field(
    {
        **CUSTOM_TYPE,
        "description": "Lowercase words joined by dots; the prefixes "
        + ", ".join(f"`{p}`" for p in RESERVED_PREFIXES)
        + " are reserved.",
    }
)
class CustomTypeField(StrictCharField):
    """A custom event type (the publishing service says what is wrong with one)."""


class EventPublishSerializer(StrictSerializer):
    # Up to 200 here, so that a longer type gets the service's message rather than DRF's.
    type = CustomTypeField(max_length=200, trim_whitespace=False)  # names are exact
    properties = serializers.DictField(
        required=False, default=dict, help_text="Anything but `published_by`, which the server sets."
    )


# ---------------------------------------------------------------- output shapes
#
# Each resource's one JSON shape. REST responses and event properties are made by the
# ``*_data`` functions below, from one module-level instance of each serializer (an
# instance builds its fields once: ``to_representation`` on it costs no more than the dicts
# it replaces). project/openapi.py turns the same serializers into the components
# ``User``, ``Session``, ``Message``... that the event declarations in events_app/types.py
# refer to by name.


@extend_schema_field(TIME)
class TimeField(serializers.Field):  # type: ignore[type-arg]
    """A datetime as RFC 3339 in UTC with a ``Z``; a string (stored already formatted, as
    in a session's status) is given as it is."""

    def to_representation(self, value: Any) -> str:
        return value if isinstance(value, str) else iso(value)


def _id(**kwargs: Any) -> serializers.CharField:
    return serializers.CharField(help_text=ID["description"], **kwargs)


def _enum(schema: dict[str, Any], **kwargs: Any) -> serializers.CharField:
    """A string from a fixed set: the schema says which (an inline enum, as the event
    declarations use, rather than a ChoiceField's separate enum component)."""
    field_class = type("EnumField", (serializers.CharField,), {"__module__": __name__})
    return extend_schema_field(schema)(field_class)(**kwargs)  # type: ignore[no-any-return]


@extend_schema_field(ANY)
class AnyField(serializers.JSONField):
    pass


class UserSerializer(serializers.Serializer):  # type: ignore[type-arg]
    id = serializers.IntegerField(source="pk")
    username = serializers.CharField(source="get_username")


class SessionStatusSerializer(serializers.Serializer):  # type: ignore[type-arg]
    type = _enum(one_of("idle", "busy", "retry"))
    attempt = serializers.IntegerField(required=False, help_text="`retry` only.")
    message = serializers.CharField(required=False, help_text="`retry` only.")
    next_at = TimeField(required=False, help_text="`retry` only.")


class AgentField(serializers.CharField):
    """The agent's name; the schema lists the agents registered when it is generated."""


class ForkedFromSerializer(serializers.Serializer):  # type: ignore[type-arg]
    """The session and message a fork was made from (ids only: the source may be gone,
    or be a session the reader is not a member of)."""

    session_id = _id()
    message_id = serializers.CharField(allow_null=True, help_text="The last message copied; null when there was none.")


@extend_schema_field({"allOf": [ref("ForkedFrom")], "nullable": True, "description": "Set on a fork; null otherwise."})
class ForkedFromField(serializers.Field):  # type: ignore[type-arg]
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(source="*", **kwargs)

    def to_representation(self, value: Session) -> dict[str, Any] | None:
        if not value.forked_from_session_id:
            return None
        return {
            "session_id": value.forked_from_session_id,
            "message_id": value.forked_from_message_id or None,
        }


class SessionSerializer(serializers.Serializer):  # type: ignore[type-arg]
    id = _id()
    title = serializers.CharField(max_length=200)
    agent = AgentField(help_text="The backend that writes the replies.")
    status = SessionStatusSerializer()
    owner = UserSerializer()
    last_seq = serializers.IntegerField(min_value=0, help_text="The head of the event log.")
    created_at = TimeField()
    updated_at = TimeField()
    role = _enum(one_of(*Role.values), required=False, help_text="The caller's role. Absent inside events.")
    forked_from = ForkedFromField()


class MemberSerializer(serializers.Serializer):  # type: ignore[type-arg]
    user = UserSerializer()
    role = _enum(one_of(*Role.values))


class ToolStateSerializer(serializers.Serializer):  # type: ignore[type-arg]
    status = _enum(TOOL_STATUS)
    input = AnyField(required=False)
    output = AnyField(required=False)
    error = serializers.CharField(required=False)


_TOOL_ONLY = ("tool", "call_id", "state")


class PartSerializer(serializers.Serializer):  # type: ignore[type-arg]
    """A message part. Inside a `message.part.updated` that carries a `delta` it is only
    `{id, type}`."""

    id = _id()
    type = _enum(one_of(*Part.PartType.values))
    text = serializers.CharField(required=False, help_text="`text` and `reasoning` parts.")
    tool = serializers.CharField(required=False, help_text="`tool` parts.")
    call_id = serializers.CharField(required=False, help_text="`tool` parts.")
    state = ToolStateSerializer(required=False)

    def to_representation(self, instance: Any) -> dict[str, Any]:
        data: dict[str, Any] = super().to_representation(instance)
        for name in ("text",) if instance.type == Part.PartType.TOOL else _TOOL_ONLY:
            data.pop(name, None)
        return data


@extend_schema_field(
    {
        "type": "object",
        "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
        "required": ["code", "message"],
        "additionalProperties": True,
    },
    component_name="MessageError",
)
class MessageErrorField(serializers.JSONField):
    """Why a reply failed, as the agent or the runner recorded it (open: agents may add
    keys)."""


class MessageSerializer(serializers.Serializer):  # type: ignore[type-arg]
    id = _id()
    session_id = _id()
    role = _enum(one_of(*Message.MessageRole.values))
    author = UserSerializer(allow_null=True)
    status = _enum(one_of(*Message.Status.values))
    created_at = TimeField()
    completed_at = TimeField(allow_null=True)
    parts = PartSerializer(many=True)
    error = MessageErrorField(required=False)
    usage = serializers.DictField(required=False, help_text="Token usage, when the agent reports it.")
    superseded_by = serializers.CharField(
        source="superseded_by_id", required=False,
        help_text="A retried reply: the id of the reply that replaced it.",
    )

    def to_representation(self, instance: Any) -> dict[str, Any]:
        data: dict[str, Any] = super().to_representation(instance)
        for name in ("error", "usage", "superseded_by"):  # present only when there is something to say
            if not data.get(name):
                data.pop(name, None)
        return data


@extend_schema_field(
    {
        "oneOf": [ref("User"), one_of("timeout")],
        "nullable": True,
        "description": 'Who answered: a user, `"timeout"` when it expired, or null.',
    },
    component_name="Resolver",
)
class ResolverField(serializers.Field):  # type: ignore[type-arg]
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(source="*", **kwargs)

    def to_representation(self, value: PermissionRequest) -> dict[str, Any] | str | None:
        return resolver_data(value)


class PermissionSerializer(serializers.Serializer):  # type: ignore[type-arg]
    id = _id()
    session_id = _id()
    message_id = _id(allow_null=True)  # null for an outside agent's question (MCP request_approval)
    call_id = _id()
    tool = serializers.CharField()
    input = AnyField()
    status = _enum(one_of(*PermissionRequest.Status.values))
    created_at = TimeField()
    expires_at = TimeField()
    resolved_by = ResolverField()
    approved = serializers.BooleanField(allow_null=True)
    reason = serializers.CharField(allow_null=True)


class SessionPageSerializer(serializers.Serializer):  # type: ignore[type-arg]
    """A page; follow `next` (null on the last page)."""

    results = SessionSerializer(many=True)
    next = serializers.CharField(allow_null=True)


class MessagePageSerializer(serializers.Serializer):  # type: ignore[type-arg]
    """A page; follow `next` (null on the last page) forward, `previous` (null on the
    first page) back."""

    results = MessageSerializer(many=True)
    next = serializers.CharField(allow_null=True)
    previous = serializers.CharField(allow_null=True)


class MessagePostedSerializer(serializers.Serializer):  # type: ignore[type-arg]
    message = MessageSerializer()
    reply_id = serializers.CharField(allow_null=True, help_text="The reply's id; `null` when the message was queued.")
    queued = serializers.BooleanField(required=False, help_text="Present (true) when the message was queued.")
    position = serializers.IntegerField(
        min_value=1, required=False, help_text="A queued message's place in the queue (1 = next)."
    )


class RetryResultSerializer(serializers.Serializer):  # type: ignore[type-arg]
    reply_id = _id()


@extend_schema_field(UserSerializer)
class UserDataField(serializers.JSONField):
    """A user already in its JSON shape (``user_data``), as presence stores it."""


class PresenceSerializer(serializers.Serializer):  # type: ignore[type-arg]
    user = UserDataField()
    connections = serializers.IntegerField(min_value=1)
    transports = serializers.ListField(child=_enum(TRANSPORT))
    state = serializers.DictField()


class RunSerializer(serializers.Serializer):  # type: ignore[type-arg]
    """The reply in progress."""

    message_id = _id()
    state = _enum(
        one_of("queued", "running"),
        help_text="`queued` until a runner (an agents worker, or the server in inline mode) "
        "takes the reply.",
    )
    queued_at = TimeField()
    started_at = TimeField(allow_null=True, help_text="`null` while queued.")


class HealthSerializer(serializers.Serializer):  # type: ignore[type-arg]
    status = SessionStatusSerializer()
    last_seq = serializers.IntegerField(min_value=0)
    connections = serializers.IntegerField(
        min_value=0, allow_null=True, help_text="`null` while Redis is unreachable: unknown."
    )
    run = RunSerializer(allow_null=True)


class SearchSessionSerializer(serializers.Serializer):  # type: ignore[type-arg]
    id = _id()
    title = serializers.CharField()


class SearchHitSerializer(serializers.Serializer):  # type: ignore[type-arg]
    """One place where the query matched: a message's text, or a session's title
    (`message_id` null)."""

    session = SearchSessionSerializer()
    message_id = serializers.CharField(allow_null=True, help_text="The matching message; null for a title match.")
    snippet = serializers.CharField(
        help_text="Plain text around the match (never HTML: show it as text)."
    )
    highlights = serializers.ListField(
        child=serializers.ListField(child=serializers.IntegerField(min_value=0), min_length=2, max_length=2),
        help_text="`[start, end)` ranges of `snippet` that matched, in Unicode code points.",
    )
    created_at = TimeField(help_text="When the message (or, for a title match, the session) was created.")


class SearchPageSerializer(serializers.Serializer):  # type: ignore[type-arg]
    """Best match first; follow `next` (null on the last page)."""

    results = SearchHitSerializer(many=True)
    next = serializers.CharField(allow_null=True)


class ExportSerializer(serializers.Serializer):  # type: ignore[type-arg]
    """A whole session, as `GET …/export/?format=json` gives it."""

    session = SessionSerializer()
    members = MemberSerializer(many=True)
    messages = MessageSerializer(many=True)
    permissions = PermissionSerializer(many=True)


class TicketSerializer(serializers.Serializer):  # type: ignore[type-arg]
    ticket = serializers.CharField()
    expires_in = serializers.IntegerField(min_value=1)


class ApiKeyCreateSerializer(StrictSerializer):
    name = StrictCharField(max_length=100, help_text="What the key is for (a machine, a tool).")


class ApiKeySerializer(serializers.Serializer):  # type: ignore[type-arg]
    """An API key as listed: never the key itself."""

    id = serializers.CharField()
    name = serializers.CharField()
    prefix = serializers.CharField(help_text="The key's first characters, to tell keys apart.")
    created_at = TimeField()
    last_used_at = TimeField(
        allow_null=True,
        help_text="When a request last came with the key, to within a minute; null if never.",
    )


class ApiKeyCreatedSerializer(ApiKeySerializer):
    key = serializers.CharField(
        help_text="The key, `tdm_…`: shown here once and never again (only its digest is stored)."
    )


class ApiKeyListSerializer(serializers.Serializer):  # type: ignore[type-arg]
    keys = ApiKeySerializer(many=True)


class AbortResultSerializer(serializers.Serializer):  # type: ignore[type-arg]
    aborted = serializers.BooleanField()


class DocumentSerializer(serializers.Serializer):  # type: ignore[type-arg]
    """The session's shared document (PROTOCOL §10)."""

    text = serializers.CharField(help_text="The Markdown text of the `Y.Text` named `doc`.")
    version = serializers.IntegerField(min_value=0, help_text="Increases with every applied change.")
    updated_at = TimeField()


# The components the OpenAPI document takes from here (project/openapi.py).
OUTPUT_SERIALIZERS: list[type[serializers.Serializer]] = [  # type: ignore[type-arg]
    UserSerializer, SessionSerializer, MemberSerializer, MessageSerializer, PartSerializer,
    PermissionSerializer, SessionPageSerializer, MessagePageSerializer, MessagePostedSerializer,
    PresenceSerializer, HealthSerializer, TicketSerializer, AbortResultSerializer,
    ApiKeySerializer, ApiKeyCreatedSerializer, ApiKeyListSerializer,
    RetryResultSerializer,
    ForkedFromSerializer, SearchHitSerializer, SearchPageSerializer, ExportSerializer,
    DocumentSerializer,
]

_USER = UserSerializer()
_SESSION = SessionSerializer()
_MEMBER = MemberSerializer()
_PART = PartSerializer()
_MESSAGE = MessageSerializer()
del _MESSAGE.fields["parts"]  # message_data adds them: its caller may have them at hand
_PERMISSION = PermissionSerializer()


def user_data(user: User | None) -> dict[str, Any] | None:
    if user is None:
        return None
    return {"id": user.pk, "username": user.get_username()}
    return None if user is None else _USER.to_representation(user)


def session_data(session: Session, role: str | None = None) -> dict[str, Any]:
    data: dict[str, Any] = _SESSION.to_representation(session)
    if role is not None:
        data["role"] = role
    return data


def member_data(membership: Membership) -> dict[str, Any]:
    return _MEMBER.to_representation(membership)


def part_data(part: Part) -> dict[str, Any]:
    return _PART.to_representation(part)


def message_data(message: Message, parts: list[Part] | None = None) -> dict[str, Any]:
    data: dict[str, Any] = _MESSAGE.to_representation(message)
    data["parts"] = [part_data(p) for p in (message.parts.all() if parts is None else parts)]
    return data


def posted_data(
    message: Message, reply: Message | None, position: int | None, data: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The answer to posting a message (``MessagePosted``), over REST and WebSocket.
    ``data``: the message as ``message_data`` made it already (for its event), which
    spares reading its parts again."""
    shown = message_data(message) if data is None else data
    if reply is not None:
        return {"message": shown, "reply_id": reply.pk}
    return {"message": shown, "reply_id": None, "queued": True, "position": position}


def resolver_data(permission: PermissionRequest) -> dict[str, Any] | str | None:
    if permission.resolved_by_timeout:
        return "timeout"
    return user_data(permission.resolved_by)


def permission_data(permission: PermissionRequest) -> dict[str, Any]:
    return _PERMISSION.to_representation(permission)


def out(serializer_class: type[serializers.Serializer], data: Any, many: bool = False) -> Any:  # type: ignore[type-arg]
    """``data`` in the shape of ``serializer_class``: for the REST responses made of plain
    values (health, presence, a ticket), which the serializer then defines."""
    return serializer_class(data, many=many).data


class PermissionReplySerializer(StrictSerializer):
    approved = serializers.BooleanField()
    reason = StrictCharField(max_length=2000, required=False, allow_blank=True, allow_null=True, default=None)

    def to_internal_value(self, data: Any) -> Any:
        # DRF's BooleanField also takes "yes", 1 and "true"; the contract says a boolean.
        if isinstance(data, dict) and "approved" in data and not isinstance(data["approved"], bool):
            raise serializers.ValidationError({"approved": ["Must be true or false."]})
        return super().to_internal_value(data)


class ForkSerializer(StrictSerializer):
    message_id = StrictCharField(
        max_length=32, required=False,
        help_text="Copy up to and including this message (default: every ended one).",
    )
    title = StrictCharField(max_length=200, required=False, allow_blank=True, help_text="Default: the source's title.")


class ExportQuerySerializer(StrictSerializer):
    format = serializers.ChoiceField(choices=["markdown", "json"], required=False, default="markdown")


SEARCH_MAX_CHARS = 200


class SearchQuerySerializer(StrictSerializer):
    q = StrictCharField(min_length=1, max_length=SEARCH_MAX_CHARS, trim_whitespace=False)
    cursor = StrictCharField(required=False, max_length=40)
    limit = serializers.IntegerField(required=False, min_value=1, max_value=100, default=20)

    def validate_q(self, value: str) -> str:
        if not value.strip():
            raise serializers.ValidationError("Must not be blank.", code="blank")
        return value


class PassedThrough(serializers.Field):  # type: ignore[type-arg]
    """A query parameter another part of the view reads and judges: taken as it is."""

    def to_internal_value(self, data: Any) -> Any:
        return data

    def to_representation(self, value: Any) -> Any:
        return value


class MessageListQuerySerializer(StrictSerializer):
    """``GET …/messages/``: forward pages (``cursor``), or backward ones: ``latest`` (the
    end of the conversation) and ``before`` (the messages before one already read)."""

    # The paginator reads these two and judges them itself, as it always did (a bad
    # cursor is `bad_request`, a bad limit gives the default: see PAGE_PARAMETERS).
    cursor = PassedThrough(required=False)
    limit = PassedThrough(required=False)
    before = StrictCharField(required=False, min_length=1, max_length=32)
    latest = serializers.BooleanField(required=False, default=False)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        chosen = [name for name in ("cursor", "before") if attrs.get(name)] + (["latest"] if attrs["latest"] else [])
        if len(chosen) > 1:
            raise serializers.ValidationError({name: ["Use only one of cursor, before and latest."] for name in chosen})
        return attrs


class PermissionListQuerySerializer(StrictSerializer):
    status = serializers.ChoiceField(choices=PermissionRequest.Status.choices, required=False)


class StrictIntegerField(serializers.IntegerField):
    """A JSON integer only: DRF's IntegerField also takes "3", 3.0 and true."""

    default_error_messages = {"not_an_integer": "Must be an integer."}

    def to_internal_value(self, data: Any) -> int:
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("not_an_integer")
        return super().to_internal_value(data)


DOC_EDITS_MAX = 1000
DOC_POSITION_MAX = 10**9


class DocEditSerializer(StrictSerializer):
    at = StrictIntegerField(
        min_value=0, max_value=DOC_POSITION_MAX,
        help_text="Where, in Unicode code points of the text as the edits before this one left it.",
    )
    delete = StrictIntegerField(
        min_value=0, max_value=DOC_POSITION_MAX, required=False, default=0,
        help_text="How many code points to delete from `at` (default 0).",
    )
    insert = StrictCharField(
        required=False, allow_blank=True, trim_whitespace=False, default="",
        help_text="Text to insert at `at`, after the deletion (default none).",
    )


class DocPatchSerializer(StrictSerializer):
    edits: serializers.ListSerializer[dict[str, Any]] = serializers.ListSerializer(
        child=DocEditSerializer(), allow_empty=False, max_length=DOC_EDITS_MAX,
        help_text="Applied in order, all or none.",
    )
    version = StrictIntegerField(
        min_value=0, required=False,
        help_text="The version the edits were made against: if the document has moved on, "
        "`409 version_conflict` and nothing is applied.",
    )


def document_data(state: Any) -> dict[str, Any]:
    """A ``sessions_app.doc.DocState`` in the shape of ``Document``."""
    return {"text": state.text, "version": state.version, "updated_at": iso(state.updated_at)}
