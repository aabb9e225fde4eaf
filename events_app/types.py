"""Every event type, declared once, and the single wire encoding of an event.

An event type's declaration (``EVENT_TYPES``) is the one place that says whether it is
persisted, which properties it has, which may be absent, and the schema of each value:
``project/openapi.py`` generates the event components of the OpenAPI document from it, and
the test suite validates every envelope ``encode`` makes against them.

A built-in event whose property names do not match its declaration is a bug in the code
that sent it, so ``encode`` refuses it loudly. Values are checked by the tests only
(``tests/envelopes.py``): in production the check would cost every event a schema
validation. Custom events (published by clients) are checked for their *name* here and
for their size by the service that publishes them.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

Schema = dict[str, Any]
"""An OpenAPI 3.0 schema object (JSON Schema plus ``nullable``)."""


# ---------------------------------------------------------------- value schemas


def ref(name: str) -> Schema:
    """A named component of the OpenAPI document. The resources (``User``, ``Session``,
    ``Message``, ``Part``, ``Permission``...) are generated from the output serializers of
    the sessions domain, which this layer cannot import: it names them."""
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: Schema) -> Schema:
    """OpenAPI 3.0 cannot put ``nullable`` next to a ``$ref``: wrap it."""
    if "$ref" in schema:
        return {"allOf": [schema], "nullable": True}
    return {**schema, "nullable": True}


def one_of(*values: str, **extra: Any) -> Schema:
    return {"type": "string", "enum": list(values), **extra}


ID: Schema = {"type": "string", "description": "An opaque id."}
TIME: Schema = {"type": "string", "format": "date-time", "description": "RFC 3339, UTC, `Z` suffix."}
ANY: Schema = {"description": "Any JSON value."}
OBJECT: Schema = {"type": "object", "additionalProperties": True}
STRING: Schema = {"type": "string"}
BOOLEAN: Schema = {"type": "boolean"}
SEQ: Schema = {"type": "integer", "minimum": 0}
ROLE = one_of("owner", "editor", "viewer")
MESSAGE_STATUS = one_of("queued", "streaming", "completed", "cancelled", "error")
TOOL_STATUS = one_of("pending", "running", "completed", "error")
TRANSPORT = one_of("sse", "ws")


@dataclass(frozen=True)
class Omittable:
    """A property an event may leave out."""

    schema: Schema


@dataclass(frozen=True)
class EventType:
    """One event type: whether it is persisted, and each property with the schema of its
    value. The OpenAPI components and ``encode``'s check both come from here."""

    name: str
    persisted: bool
    properties: Mapping[str, Schema]
    optional: frozenset[str] = frozenset()
    required: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "required", frozenset(self.properties) - self.optional)


def _t(name: str, persisted: bool, **properties: Schema | Omittable) -> EventType:
    return EventType(
        name,
        persisted,
        {k: v.schema if isinstance(v, Omittable) else v for k, v in properties.items()},
        frozenset(k for k, v in properties.items() if isinstance(v, Omittable)),
    )


_PRESENCE: dict[str, Schema | Omittable] = {
    "user": ref("User"), "connection_id": ID, "transport": TRANSPORT, "state": Omittable(OBJECT),
}
CURSOR: Schema = {"type": "string", "description": "A position in every session (user-level stream)."}

EVENT_TYPES: dict[str, EventType] = {
    t.name: t
    for t in [
        _t(
            "server.connected", False,
            connection_id=ID,
            last_seq=nullable({**SEQ, "description": "The head at connect; null on the user-level stream."}),
            resumed=BOOLEAN,
            cursor=Omittable(CURSOR),
        ),
        _t("server.heartbeat", False),
        _t("stream.reset", False, reason=one_of("history_expired", "unknown_position"), last_seq=SEQ),
        _t("auth.expired", False),
        _t("session.created", True, session=ref("Session")),
        _t("session.updated", True, session=ref("Session")),
        _t("session.deleted", False, session_id=ID),
        _t("session.status", True, status=ref("SessionStatus")),
        _t("member.added", True, user=ref("User"), role=ROLE),
        _t("member.removed", True, user=ref("User"), role=ROLE),
        _t("message.created", True, message=ref("Message")),
        _t(
            "message.part.updated", True,
            message_id=ID,
            part=ref("Part"),
            delta=Omittable({"type": "string", "description": "Text to append to the part."}),
        ),
        _t("message.completed", True, message_id=ID, status=MESSAGE_STATUS, error=Omittable(ref("MessageError"))),
        _t(
            "message.updated", True,
            message_id=ID,
            status=MESSAGE_STATUS,
            superseded_by=Omittable({**ID, "description": "A retried reply: the reply that replaced it."}),
        ),
        _t("message.removed", True, message_id=ID),
        _t(
            "doc.updated", True,
            version={**SEQ, "description": "The shared document's version after the change."},
            by={
                "oneOf": [ref("User"), one_of("agent")],
                "nullable": True,
                "description": 'Who made the latest change: a user, `"agent"`, or null when '
                "the author's account has been deleted since.",
            },
        ),
        _t(
            "tool.status", True,
            message_id=ID, call_id=ID, tool=STRING, status=TOOL_STATUS,
            input=Omittable(ANY), output=Omittable(ANY), error=Omittable(STRING),
        ),
        _t("permission.requested", True, permission=ref("Permission")),
        _t(
            "permission.resolved", True,
            permission_id=ID, approved=BOOLEAN, reason=nullable(STRING), resolved_by=ref("Resolver"),
        ),
        _t("presence.joined", False, **_PRESENCE),
        _t("presence.left", False, **_PRESENCE),
        _t("presence.updated", False, **_PRESENCE),
    ]
}


def referenced_components() -> set[str]:
    """The components the event declarations name, which the OpenAPI document must define."""
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("$ref"), str):
                found.add(node["$ref"].rsplit("/", 1)[-1])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for event in EVENT_TYPES.values():
        walk(dict(event.properties))
    return found


RESERVED_PREFIXES = (
    "server.", "stream.", "session.", "message.", "permission.", "presence.", "auth.", "member.",
    "doc.",
)
# Matched with fullmatch: "$" also matches before a trailing newline, and a type ending
# in "\n" would break the "event:" line of every named SSE stream.
CUSTOM_TYPE_RE = re.compile(r"[a-z][a-z0-9_]*(\.[a-z0-9_]+)+")
CUSTOM_TYPE_MAX = 64
_RESERVED = "|".join(re.escape(p.rstrip(".")) for p in RESERVED_PREFIXES)
CUSTOM_TYPE: Schema = {
    "type": "string",
    "maxLength": CUSTOM_TYPE_MAX,
    "pattern": rf"^(?!({_RESERVED})\.)[a-z][a-z0-9_]*(\.[a-z0-9_]+)+$",
    "not": {"enum": sorted(EVENT_TYPES)},
}
# Control events pass every ?types= filter: a client must always learn about its stream.
ALWAYS_DELIVERED_PREFIXES = ("server.", "stream.")


def is_persisted(type_name: str) -> bool:
    definition = EVENT_TYPES.get(type_name)
    return True if definition is None else definition.persisted


def custom_type_problem(type_name: Any) -> str | None:
    """Why ``type_name`` cannot be a custom event type, or None when it can."""
    if not isinstance(type_name, str):
        return "Must be a string."
    if len(type_name) > CUSTOM_TYPE_MAX:
        return f"At most {CUSTOM_TYPE_MAX} characters."
    if not CUSTOM_TYPE_RE.fullmatch(type_name):
        return "Must look like 'task.progress': lowercase words joined by dots."
    if type_name.startswith(RESERVED_PREFIXES):
        return f"The prefix '{type_name.split('.')[0]}.' is reserved."
    if type_name in EVENT_TYPES:  # tool.status: not under a reserved prefix, still ours
        return f"'{type_name}' is a built-in event type."
    return None


def check_builtin(type_name: str, properties: dict[str, Any]) -> None:
    definition = EVENT_TYPES.get(type_name)
    if definition is None:
        return
    keys = set(properties)
    missing = definition.required - keys
    extra = keys - definition.required - definition.optional
    if missing or extra:
        raise ValueError(
            f"{type_name}: missing {sorted(missing)} / undeclared {sorted(extra)} properties"
        )


def iso(dt: datetime) -> str:
    return dt.isoformat().replace("+00:00", "Z")


def encode(
    *, seq: int | None, session_id: str | None, type_name: str, time: str, properties: dict[str, Any]
) -> str:
    """The one encoding of an envelope. Everything a client reads is made here."""
    check_builtin(type_name, properties)
    return orjson.dumps(
        {
            "seq": seq,
            "session_id": session_id,
            "type": type_name,
            "time": time,
            "properties": properties,
        }
    ).decode()


class Frame:
    """One event as it leaves this process: encoded once, its SSE variants made lazily
    and cached, then written as the same bytes to every local connection."""

    __slots__ = ("seq", "session_id", "type", "envelope", "_sse", "_sse_named")

    def __init__(self, seq: int | None, session_id: str | None, type_name: str, envelope: str):
        self.seq = seq
        self.session_id = session_id
        self.type = type_name
        self.envelope = envelope
        self._sse: bytes | None = None
        self._sse_named: bytes | None = None

    @classmethod
    def make(
        cls, session_id: str | None, type_name: str, time: str, properties: dict[str, Any]
    ) -> Frame:
        """An ephemeral (never persisted) event."""
        envelope = encode(
            seq=None, session_id=session_id, type_name=type_name, time=time, properties=properties
        )
        return cls(None, session_id, type_name, envelope)

    def sse(self, named: bool = False) -> bytes:
        if named:
            if self._sse_named is None:
                self._sse_named = sse_bytes(self.envelope, self.seq, self.type)
            return self._sse_named
        if self._sse is None:
            self._sse = sse_bytes(self.envelope, self.seq, None)
        return self._sse

    def with_cursor(self, cursor: str) -> str:
        """The envelope with ``"cursor"`` added, for user-level streams: spliced into the
        stored JSON rather than decoded and encoded again."""
        return f'{self.envelope[:-1]},"cursor":"{cursor}"}}'


def sse_bytes(envelope: str, event_id: int | str | None, event_name: str | None) -> bytes:
    head = f"id: {event_id}\n" if event_id is not None else ""
    # A line break would end the "event:" line and inject fields into the stream; an
    # event stored before types were checked strictly goes out unnamed instead.
    if event_name is not None and "\n" not in event_name and "\r" not in event_name:
        head += f"event: {event_name}\n"
    return f"{head}data: {envelope}\n\n".encode()


class TypeFilter:
    """``?types=a.b,c.*``: exact types and ``prefix.*`` patterns matching any depth below."""

    __slots__ = ("exact", "prefixes", "_memo")

    MEMO_SIZE = 256  # event types are clients' strings: bounded, then started afresh

    def __init__(self, exact: frozenset[str], prefixes: tuple[str, ...]) -> None:
        self.exact = exact
        self.prefixes = prefixes  # each ends with "."
        # Asked once per event per stream: the answer per type is kept.
        self._memo: dict[str, bool] = {}

    @classmethod
    def parse(cls, raw: str | None) -> TypeFilter | None:
        """None when absent; ValueError naming the first bad pattern."""
        if raw is None:
            return None
        exact: set[str] = set()
        prefixes: list[str] = []
        for pattern in (p.strip() for p in raw.split(",")):
            if pattern.endswith(".*") and _is_type_name(pattern[:-2]):
                prefixes.append(pattern[:-1])
            elif _is_type_name(pattern):
                exact.add(pattern)
            else:
                raise ValueError(f"'{pattern}' is not an event type or a 'prefix.*' pattern.")
        return cls(frozenset(exact), tuple(prefixes))

    def __call__(self, type_name: str) -> bool:
        memo = self._memo
        answer = memo.get(type_name)
        if answer is None:
            answer = (
                type_name in self.exact
                or type_name.startswith(self.prefixes)
                or type_name.startswith(ALWAYS_DELIVERED_PREFIXES)
            )
            if len(memo) >= self.MEMO_SIZE:
                memo.clear()
            memo[type_name] = answer
        return answer


_TYPE_NAME_RE = re.compile(r"[a-z][a-z0-9_]*(\.[a-z0-9_]+)*")


def _is_type_name(value: str) -> bool:
    return len(value) <= CUSTOM_TYPE_MAX and bool(_TYPE_NAME_RE.fullmatch(value))
