"""The OpenAPI description of the API (drf-spectacular), served at ``/api/schema/``.

Nothing is described twice. What DRF's introspection does not reach is added here:

- the resources (``User``, ``Session``, ``Message``, ``Permission``...), resolved from the
  output serializers of ``sessions_app/serializers.py`` that also make the responses and
  the events' properties;
- every event type, generated from its one declaration in ``events_app.types.EVENT_TYPES``
  (properties and value schemas), and the envelope as a ``oneOf`` over them;
- by hand, only what neither says: the one error shape, the empty body, the bodies of
  simplejwt's token views, and the page of pre-encoded envelopes (``EventPage``);
- the SSE stream endpoints, which are Channels consumers rather than DRF views;
- the error responses every operation can give (401, 429, 400/413/415 for bodies, 500),
  on top of those each view declares with ``doc(errors=...)``.

``REST_FRAMEWORK["DEFAULT_SCHEMA_CLASS"]`` stays DRF's own, so views are annotated with
``doc()`` (``extend_schema`` built on ``TandemAutoSchema``) and ``TandemSchemaGenerator``
gives every other view a drf-spectacular schema.
"""
from __future__ import annotations

import copy
import functools
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from django.core.validators import ProhibitNullCharactersValidator
from drf_spectacular.extensions import (
    OpenApiAuthenticationExtension,
    OpenApiSerializerExtension,
    OpenApiSerializerFieldExtension,
    OpenApiViewExtension,
)
from drf_spectacular.generators import SchemaGenerator
from drf_spectacular.openapi import AutoSchema
from drf_spectacular.plumbing import ComponentRegistry
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import serializers
from rest_framework.schemas.openapi import AutoSchema as DRFAutoSchema

from events_app.types import (
    CURSOR,
    CUSTOM_TYPE,
    CUSTOM_TYPE_MAX,
    EVENT_TYPES,
    ID,
    SEQ,
    STRING,
    TIME,
    EventType,
    nullable,
    ref,
    referenced_components,
)
from project import thirdparty
from sessions_app.agents import registry
from sessions_app.serializers import OUTPUT_SERIALIZERS

# ---------------------------------------------------------------- helpers

F = TypeVar("F", bound=Callable[..., Any])

NO_NUL = r"^[^\x00]*$"  # DRF's CharField refuses NUL characters
ERROR = ref("Error")

ERROR_DESCRIPTIONS: dict[int, str] = {
    400: "`bad_request` (malformed JSON, a body that is not a JSON object, a bad query "
    "parameter) or `validation_error` (a field is missing, unknown or wrong; `details` "
    "maps each field to its messages).",
    401: "`not_authenticated` (no credentials) or `authentication_failed` (bad, forged or "
    "expired credentials, or an `Authorization` header that is not `Bearer <jwt>`).",
    403: "`permission_denied`: your role in the session does not allow this.",
    404: "`not_found`: no such session, or you are not a member of it (existence is not "
    "leaked).",
    409: "`conflict`: the request conflicts with the current state.",
    413: "`payload_too_large`: the body is over the server's limit.",
    415: "`unsupported_media_type`: send the body as `application/json`.",
    429: "`rate_limited`: too many writes (`TANDEM_RATE_WRITE`); retry after `Retry-After` "
    "seconds.",
    500: "`internal_error`: an unexpected failure (never a stack trace).",
    503: "`unavailable`: a dependency is unreachable.",
}

RESPONSE_HEADERS: dict[int, dict[str, Any]] = {
    401: {
        "WWW-Authenticate": {
            "description": 'Always `Bearer realm="api"`.',
            "schema": {"type": "string"},
        }
    },
    429: {
        "Retry-After": {
            "description": "Whole seconds to wait before retrying.",
            "schema": {"type": "integer", "minimum": 1},
        }
    },
}

WRITE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
AUTH_THROTTLED = (
    "`rate_limited`: too many sign-in requests from your address (`TANDEM_RATE_AUTH_IP`) "
    "or for this account (`TANDEM_RATE_AUTH_USER`; tickets: `TANDEM_RATE_TICKET`); retry "
    "after `Retry-After` seconds."
)


def error_response(status: int, description: str | None = None) -> dict[str, Any]:
    """A raw OpenAPI response object in the one error shape."""
    response: dict[str, Any] = {
        "description": description or ERROR_DESCRIPTIONS.get(status, "An error."),
        "content": {"application/json": {"schema": ERROR}},
    }
    if status in RESPONSE_HEADERS:
        response["headers"] = dict(RESPONSE_HEADERS[status])
    return response


def _error_map(errors: Mapping[int, str] | Iterable[int]) -> dict[int, str]:
    if isinstance(errors, Mapping):
        return {int(k): v for k, v in errors.items()}
    return {int(status): ERROR_DESCRIPTIONS.get(int(status), "An error.") for status in errors}


def _resolve(schema: dict[str, Any]) -> dict[str, Any]:
    name = schema.get("$ref", "").removeprefix("#/components/schemas/")
    return cached_components().get(name, schema) if name else schema


# ---------------------------------------------------------------- schema class & generator


class TandemAutoSchema(AutoSchema):
    """drf-spectacular's AutoSchema, plus the error responses an operation can give
    whatever the view says: 500 always, 401 when it needs credentials, 429 for
    throttled writes, 400/413/415 when it takes a body. Each in the error shape."""

    def get_operation(self, path: str, path_regex: str, path_prefix: str, method: str, registry: Any) -> Any:
        operation = super().get_operation(path, path_regex, path_prefix, method, registry)
        if not operation:
            return operation
        body = operation.get("requestBody")
        if body and not body.get("required"):
            # drf-spectacular marks raw request schemas optional; a schema with required
            # fields makes the body required.
            for media in body.get("content", {}).values():
                if _resolve(media.get("schema") or {}).get("required"):
                    body["required"] = True
        responses: dict[str, Any] = operation.setdefault("responses", {})
        implied = [500]
        security = operation.get("security") or []
        authenticated = bool(security) and {} not in security
        if authenticated:
            implied.append(401)
        if "requestBody" in operation:
            implied += [400, 413, 415]
        if method.upper() in WRITE_METHODS and authenticated and not path.startswith("/api/auth/"):
            implied.append(429)
        if method.upper() == "POST" and path.startswith("/api/auth/"):
            responses.setdefault("429", error_response(429, AUTH_THROTTLED))
        for status in implied:
            responses.setdefault(str(status), error_response(status))
        for code, response in responses.items():
            if not code.isdigit() or int(code) < 400 or "$ref" in response:
                continue
            # Errors are JSON whatever the view renders otherwise (ApiErrorMiddleware).
            response["content"] = {"application/json": {"schema": ERROR}}
            if int(code) in RESPONSE_HEADERS:
                response.setdefault("headers", dict(RESPONSE_HEADERS[int(code)]))
            elif int(code) == 503 and "Retry-After" in response.get("description", ""):
                response.setdefault("headers", dict(RESPONSE_HEADERS[429]))
        operation["responses"] = dict(sorted(responses.items()))
        return operation


def doc(*, errors: Mapping[int, str] | Iterable[int] = (), **kwargs: Any) -> Callable[[F], F]:
    """``extend_schema`` for a view method, built on TandemAutoSchema, with ``errors``
    (status codes, or status -> description) added to ``responses`` in the error shape."""
    responses = dict(kwargs.pop("responses", {}) or {})
    for status, description in _error_map(errors).items():
        # TandemAutoSchema adds the headers (WWW-Authenticate, Retry-After).
        responses[status] = OpenApiResponse(response=ERROR, description=description)
    if responses:
        kwargs["responses"] = responses

    def decorator(func: F) -> F:
        # extend_schema builds its schema class on ``func.schema`` when there is one,
        # else on REST_FRAMEWORK's DEFAULT_SCHEMA_CLASS (DRF's, not drf-spectacular's).
        func.schema = TandemAutoSchema  # type: ignore[attr-defined]
        return extend_schema(**kwargs)(func)

    return decorator


class TandemSchemaGenerator(SchemaGenerator):
    """Gives views without a drf-spectacular schema (DRF's default applies here, and
    third-party views such as simplejwt's) TandemAutoSchema."""

    def create_view(self, callback: Any, method: str, request: Any = None) -> Any:
        cls = getattr(callback, "cls", None)
        if (
            cls is None
            or isinstance(cls.schema, AutoSchema)
            or OpenApiViewExtension.get_match(callback) is not None  # replaced there
        ):
            return super().create_view(callback, method, request)  # type: ignore[no-untyped-call]
        # Like drf-spectacular's own view replacement: a throwaway subclass for the
        # duration of the inspection, so the URLconf's class is never changed.
        callback.cls = type(
            cls.__name__,
            (cls,),
            {"schema": TandemAutoSchema(), "__module__": cls.__module__, "__doc__": cls.__doc__},
        )
        try:
            view = super().create_view(callback, method, request)  # type: ignore[no-untyped-call]
        finally:
            callback.cls = cls
        if not isinstance(view.schema, AutoSchema) or isinstance(view.schema, DRFAutoSchema):
            raise TypeError(
                f"{cls.__name__}.{method.lower()} is annotated with drf_spectacular's "
                "extend_schema on DRF's AutoSchema; use project.openapi.doc instead."
            )
        return view


# ---------------------------------------------------------------- authentication


class BearerJWTScheme(OpenApiAuthenticationExtension):
    target_class = "project.auth.StrictJWTAuthentication"
    name = "bearerAuth"

    def get_security_definition(self, auto_schema: Any) -> dict[str, Any]:
        return {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "JWT",
            "description": "An access token from `POST /api/auth/token/`. Any other "
            "`Authorization` value (`Basic …`, `Token …`, a bare `Bearer`) is a 401.",
        }


class CookieSessionScheme(OpenApiAuthenticationExtension):
    target_class = "rest_framework.authentication.SessionAuthentication"
    name = "cookieAuth"
    priority = 1  # over drf-spectacular's own, for the description

    def get_security_definition(self, auto_schema: Any) -> dict[str, Any]:
        from django.conf import settings

        return {
            "type": "apiKey",
            "in": "cookie",
            "name": settings.SESSION_COOKIE_NAME,
            "description": "The Django session cookie of the browser UI. Unsafe methods "
            "also need the CSRF token in `X-CSRFToken`.",
        }


STREAM_SECURITY_SCHEMES = {
    "tokenQuery": {
        "type": "apiKey",
        "in": "query",
        "name": "token",
        "description": "An access JWT as `?token=`: stream endpoints only (`EventSource` "
        "cannot set headers). Ignored on REST endpoints.",
    },
    "ticketQuery": {
        "type": "apiKey",
        "in": "query",
        "name": "ticket",
        "description": "A stream ticket from `POST /api/auth/ticket/` as `?ticket=`: "
        "stream endpoints only. Prefer it to `?token=`: proxies log URLs.",
    },
}


class StrictSerializerExtension(OpenApiSerializerExtension):
    """Request serializers refuse unknown fields: say so."""

    target_class = "sessions_app.serializers.StrictSerializer"
    match_subclasses = True

    def map_serializer(self, auto_schema: Any, direction: str) -> Any:
        schema = thirdparty.basic_serializer_schema(auto_schema, self.target, direction)
        schema["additionalProperties"] = False
        own_doc = type(self.target).__dict__.get("__doc__")
        schema["description"] = own_doc or "Unknown fields are `400 validation_error`."
        for name, field in self.target.fields.items():
            prop = schema.get("properties", {}).get(name)
            if not prop:
                continue
            # DRF's CharField refuses NUL characters (400), which drf-spectacular omits.
            if isinstance(field, serializers.CharField) and "pattern" not in prop and any(
                isinstance(v, ProhibitNullCharactersValidator) for v in field.validators
            ):
                prop["pattern"] = NO_NUL
            # drf-spectacular leaves out the bounds of nested lists (``many=True``).
            if not isinstance(field, serializers.ListSerializer) or prop.get("type") != "array":
                continue
            # (set by ListSerializer.__init__, which the stubs do not declare)
            min_length: int | None = getattr(field, "min_length", None)
            max_length: int | None = getattr(field, "max_length", None)
            if not field.allow_empty:
                prop.setdefault("minItems", max(1, min_length or 1))
            elif min_length is not None:
                prop.setdefault("minItems", min_length)
            if max_length is not None:
                prop.setdefault("maxItems", max_length)
        return schema


# ---------------------------------------------------------------- simplejwt's views


def json_body(schema: dict[str, Any]) -> dict[str, Any]:
    """A raw request schema for ``doc(request=...)``."""
    return {"application/json": schema}


class TokenObtainPairViewSchema(OpenApiViewExtension):
    target_class = "rest_framework_simplejwt.views.TokenObtainPairView"

    def view_replacement(self) -> Any:
        class Fixed(self.target_class):  # type: ignore[name-defined,misc]
            schema = TandemAutoSchema()

            @doc(
                operation_id="auth_token_create",
                summary="Log in: an access and a refresh token",
                tags=["auth"],
                request=json_body(ref("TokenObtainRequest")),
                responses={200: OpenApiResponse(ref("TokenPair"), description="The tokens.")},
                errors={401: "`authentication_failed`: wrong username or password."},
                auth=[],
            )
            def post(self, request: Any, *args: Any, **kwargs: Any) -> Any:
                return super().post(request, *args, **kwargs)

        return Fixed


class TokenRefreshViewSchema(OpenApiViewExtension):
    target_class = "rest_framework_simplejwt.views.TokenRefreshView"

    def view_replacement(self) -> Any:
        class Fixed(self.target_class):  # type: ignore[name-defined,misc]
            schema = TandemAutoSchema()

            @doc(
                operation_id="auth_token_refresh_create",
                summary="A fresh access token from a refresh token",
                tags=["auth"],
                request=json_body(ref("TokenRefreshRequest")),
                responses={200: OpenApiResponse(ref("AccessToken"), description="A new access token.")},
                errors={401: "`authentication_failed`: the refresh token is bad or expired."},
                auth=[],
            )
            def post(self, request: Any, *args: Any, **kwargs: Any) -> Any:
                return super().post(request, *args, **kwargs)

        return Fixed


# ---------------------------------------------------------------- reusable parameters

SAFE_SEGMENT = r"^(?!\.\.?$)[^/]+$"  # one path segment; "." and ".." would be normalised away

SESSION_ID = OpenApiParameter(
    "session_id", {"type": "string", "pattern": SAFE_SEGMENT}, OpenApiParameter.PATH,
    description="The session's id.",
)
PERMISSION_ID = OpenApiParameter(
    "permission_id", {"type": "string", "pattern": SAFE_SEGMENT}, OpenApiParameter.PATH,
    description="The permission request's id.",
)
KEY_ID = OpenApiParameter(
    "key_id", {"type": "string", "pattern": SAFE_SEGMENT}, OpenApiParameter.PATH,
    description="The API key's id.",
)
MESSAGE_ID = OpenApiParameter(
    "message_id", {"type": "string", "pattern": SAFE_SEGMENT}, OpenApiParameter.PATH,
    description="The message's id.",
)
USERNAME = OpenApiParameter(
    "username", {"type": "string", "pattern": SAFE_SEGMENT}, OpenApiParameter.PATH,
    description="The member's username.",
)
PAGE_PARAMETERS = [
    OpenApiParameter(
        "cursor", str, OpenApiParameter.QUERY,
        description="Where the page starts: take it from the previous page's `next`. A "
        "cursor the server did not make is `400 bad_request`.",
    ),
    OpenApiParameter(
        "limit", {"type": "integer", "minimum": 1, "maximum": 200}, OpenApiParameter.QUERY,
        description="Page size: default 50, at most 200 (larger values are capped, "
        "values that are not a positive integer give the default).",
    ),
]
MESSAGE_PAGE_PARAMETERS = [
    OpenApiParameter(
        "latest", bool, OpenApiParameter.QUERY,
        description="`true`: the last page (the latest `limit` messages, then the queue), "
        "oldest first; its `previous` reads back. Not with `cursor` or `before`.",
    ),
    OpenApiParameter(
        "before", {"type": "string", "maxLength": 32}, OpenApiParameter.QUERY,
        description="A message id: the `limit` messages whose turns come just before it, "
        "oldest first (no queued ones). Not with `cursor` or `latest`. A message that is "
        "not in the session, or is queued, is `400 validation_error`.",
    ),
]
TYPES_PATTERN = r"^[a-z][a-z0-9_]*(\.[a-z0-9_]+)*(\.\*)?(,[a-z][a-z0-9_]*(\.[a-z0-9_]+)*(\.\*)?)*$"
TYPES_PARAMETER = OpenApiParameter(
    "types", {"type": "string", "pattern": TYPES_PATTERN}, OpenApiParameter.QUERY,
    description="Comma-separated event types, or prefixes ending in `.*` that match every "
    "type below them at any depth (`message.*` matches `message.part.updated`). Each "
    f"name at most {CUSTOM_TYPE_MAX} characters. A malformed pattern is `400 bad_request`.",
)
EVENTS_PARAMETERS = [
    OpenApiParameter(
        "after", {"type": "integer", "minimum": 0},
        OpenApiParameter.QUERY,
        description="Return the persisted events after this seq (default 0: from the start). "
        "Any number of digits: beyond the head is `reset: true`.",
    ),
    OpenApiParameter(
        "limit", {"type": "integer", "minimum": 1, "maximum": 1000}, OpenApiParameter.QUERY,
        description="At most this many events (default 100). Out of range is `400 bad_request`.",
    ),
    TYPES_PARAMETER,
]


# ---------------------------------------------------------------- components


def _object(properties: dict[str, Any], required: Iterable[str] | None = None, **extra: Any) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    names = list(properties) if required is None else list(required)
    if names:
        schema["required"] = names
    schema.update(extra)
    return schema


class AgentFieldSchema(OpenApiSerializerFieldExtension):
    """A session's agent: one of the agents registered when the document is made."""

    target_class = "sessions_app.serializers.AgentField"

    def map_serializer_field(self, auto_schema: Any, direction: Any) -> Any:
        return {"type": "string", "enum": registry.names()}


def resource_components() -> dict[str, dict[str, Any]]:
    """The resources (``User``, ``Session``, ``Message``, ``Permission``...) from their
    output serializers. Resolved outside the views' registry, after drf-spectacular's enum
    hook, so their enums stay inline as in the event declarations."""
    auto = TandemAutoSchema()
    auto.registry = ComponentRegistry()
    auto.method, auto.path = "GET", "/"
    for serializer in OUTPUT_SERIALIZERS:
        # A non-empty context: drf-spectacular would otherwise ask the view for one.
        auto.resolve_serializer(serializer(context={"openapi": True}), "response")
    built: dict[str, dict[str, Any]] = auto.registry.build({}).get("schemas", {})
    return built


@functools.lru_cache(maxsize=1)
def cached_components() -> dict[str, dict[str, Any]]:
    return components()


def components() -> dict[str, dict[str, Any]]:
    """The components no serializer or event declaration defines (see the module's
    docstring), and the event components generated from the declarations."""
    return {
        "Error": _object(
            {
                "error": _object(
                    {
                        "code": {
                            "type": "string",
                            "description": "Machine-readable: `bad_request`, `validation_error`, "
                            "`not_authenticated`, `authentication_failed`, `permission_denied`, "
                            "`not_found`, `method_not_allowed`, `not_acceptable`, `conflict`, "
                            "`session_busy`, `already_resolved`, `payload_too_large`, "
                            "`unsupported_media_type`, `rate_limited`, `too_many_connections`, "
                            "`internal_error`, `unavailable` (others may be added).",
                        },
                        "message": {"type": "string", "description": "For humans."},
                        "details": {
                            "type": "object",
                            "additionalProperties": True,
                            "description": "Often empty; for `validation_error` it maps each "
                            "field to its messages.",
                        },
                    }
                )
            },
            description="Every non-2xx JSON response.",
        ),
        "TokenObtainRequest": _object(
            {
                "username": {"type": "string", "minLength": 1, "pattern": NO_NUL},
                "password": {"type": "string", "minLength": 1, "pattern": NO_NUL},
            },
            additionalProperties=False,
        ),
        "TokenRefreshRequest": _object(
            {"refresh": {"type": "string", "minLength": 1, "pattern": NO_NUL}},
            additionalProperties=False,
        ),
        "EmptyRequest": {
            "type": "object",
            "maxProperties": 0,
            "description": "No fields: send no body, or `{}`. Any field is `400 validation_error`.",
        },
        "TokenPair": _object({"access": STRING, "refresh": STRING}),
        "AccessToken": _object({"access": STRING}),
        "EventPage": _object(
            {
                "events": {"type": "array", "items": ref("Event")},
                "last_seq": SEQ,
                "reset": {
                    "type": "boolean",
                    "description": "True, with no events, when the events after `after` were "
                    "pruned or `after` is beyond the head: refetch state, continue from "
                    "`last_seq`.",
                },
            }
        ),
        **event_components(),
    }


# ---------------------------------------------------------------- events

def event_component_name(type_name: str) -> str:
    return "".join(word.capitalize() for word in re.split(r"[._]", type_name)) + "Event"


def _event_schema(event: EventType) -> dict[str, Any]:
    properties = {name: event.properties[name] for name in sorted(event.properties)}
    props_schema: dict[str, Any] = {
        "type": "object",
        "properties": properties,
        "additionalProperties": False,
    }
    if event.required:
        props_schema["required"] = sorted(event.required)
    if event.persisted:
        seq = {"type": "integer", "minimum": 1, "description": "Per session, from 1, never reused."}
        session_id: dict[str, Any] = ID
        kind = "Persisted: it has a `seq` and is replayed on resume."
    else:
        seq = {"type": "integer", "nullable": True, "enum": [None], "description": "Always null."}
        session_id = nullable(ID)
        kind = "Ephemeral: `seq` is null and it is never replayed."
    optional = sorted(event.optional)
    return _object(
        {
            "seq": seq,
            "session_id": session_id,
            "type": {"type": "string", "enum": [event.name]},
            "time": TIME,
            "properties": props_schema,
            "cursor": CURSOR,
        },
        ["seq", "session_id", "type", "time", "properties"],
        description=f"`{event.name}`. {kind}"
        + (f" Optional properties: {', '.join(f'`{n}`' for n in optional)}." if optional else ""),
    )


def event_components() -> dict[str, dict[str, Any]]:
    schemas = {event_component_name(name): _event_schema(t) for name, t in EVENT_TYPES.items()}
    schemas["CustomEvent"] = _object(
        {
            "seq": {"type": "integer", "minimum": 1},
            "session_id": ID,
            "type": CUSTOM_TYPE,
            "time": TIME,
            "properties": {
                "type": "object",
                "properties": {"published_by": ref("User")},
                "required": ["published_by"],
                "additionalProperties": True,
            },
            "cursor": CURSOR,
        },
        ["seq", "session_id", "type", "time", "properties"],
        description="A custom event published by a client (`POST …/events/`, WebSocket "
        "`publish`): its properties as published, plus `published_by`. Persisted.",
    )
    schemas["Event"] = {
        "description": "The envelope, one shape on SSE, WebSocket and the events endpoint. "
        "`type` says which of these it is: " + ", ".join(f"`{n}`" for n in EVENT_TYPES)
        + ", or a custom type. On the user-level stream persisted events also carry "
        "`cursor`.",
        "oneOf": [ref(event_component_name(name)) for name in EVENT_TYPES] + [ref("CustomEvent")],
        "x-event-types": {name: ref(event_component_name(name))["$ref"] for name in EVENT_TYPES},
    }
    return schemas


# ---------------------------------------------------------------- the stream endpoints


def _stream_operation(*, session: bool) -> dict[str, Any]:
    parameters: list[dict[str, Any]] = []
    if session:
        parameters.append(
            {
                "name": "session_id", "in": "path", "required": True,
                "schema": {"type": "string", "pattern": SAFE_SEGMENT},
                "description": "The session's id.",
            }
        )
    resume = (
        {"type": "integer", "minimum": 0}
        if session
        else {"type": "string", "description": "An opaque cursor (an event's `cursor`)."}
    )
    parameters += [
        {
            "name": "types", "in": "query", "required": False,
            "schema": {"type": "string", "pattern": TYPES_PATTERN},
            "description": "Only these event types (see `GET …/events/`); `server.*` and "
            "`stream.*` always pass.",
        },
        {
            "name": "named", "in": "query", "required": False,
            "schema": {"type": "string", "enum": ["1", "true", "0", "false"]},
            "description": "`1` or `true`: each frame also has `event: <type>` for "
            "`addEventListener`.",
        },
        {
            "name": "last_event_id", "in": "query", "required": False, "schema": resume,
            "description": "Resume after this "
            + ("seq (`0`: from the start)" if session else "cursor")
            + "; the `Last-Event-ID` header wins when both are sent. Malformed: 400"
            + ("; beyond the head (any number of digits): `stream.reset`." if session else "."),
        },
        {
            "name": "Last-Event-ID", "in": "header", "required": False, "schema": resume,
            "description": "Resume position, as `EventSource` sends it on reconnect.",
        },
        {
            "name": "token", "in": "query", "required": False, "schema": {"type": "string"},
            "description": "An access JWT (streams only). The stream ends with `auth.expired` "
            "when it expires.",
        },
        {
            "name": "ticket", "in": "query", "required": False, "schema": {"type": "string"},
            "description": "A stream ticket from `POST /api/auth/ticket/` (streams only).",
        },
    ]
    what = "one session" if session else "every session the caller belongs to (the user-level stream)"
    errors = {
        400: error_response(400, "`bad_request`: a malformed `Last-Event-ID`/`last_event_id`"
                            + ("" if session else " cursor") + " or `types`."),
        401: error_response(401),
        **({404: error_response(404)} if session else {}),
        405: error_response(405, "`method_not_allowed`: streams are read with GET."),
        429: {
            **error_response(429, "`too_many_connections`: over "
                             "`TANDEM_MAX_CONNECTIONS_PER_USER` open streams."),
        },
        500: error_response(500),
        503: {
            **error_response(503, "`unavailable`: Redis, which carries live events, is "
                             "unreachable; reconnect after `Retry-After`."),
            "headers": dict(RESPONSE_HEADERS[429]),
        },
    }
    return {
        "operationId": "sessions_stream" if session else "stream",
        "summary": f"Server-Sent Events: {what}",
        "description": (
            "A Channels consumer, not a REST view: the response never ends on its own. "
            "`200` `text/event-stream`; the body starts with `retry: 3000`, then "
            "`server.connected`, then (when resuming) every persisted event after the "
            "position, then live events. Each frame is `id: <"
            + ("seq" if session else "cursor")
            + ">` (persisted events only), `event: <type>` (with `?named=1`), and one "
            "`data:` line holding an event envelope: see the `Event` schema "
            "(`#/components/schemas/Event`). `server.heartbeat` after "
            "`TANDEM_HEARTBEAT_SECONDS` of silence. Errors before the stream starts are "
            "ordinary JSON errors. The same stream over WebSocket: `/ws/"
            + ("sessions/{session_id}/" if session else "stream/")
            + "`."
        ),
        "tags": ["streams"],
        "parameters": parameters,
        "security": [
            {"bearerAuth": []}, {"cookieAuth": []}, {"tokenQuery": []}, {"ticketQuery": []},
        ],
        "responses": {
            "200": {
                "description": "The event stream. Each `data:` line is an `Event`.",
                "headers": {
                    "Cache-Control": {"schema": {"type": "string", "enum": ["no-cache"]}},
                    "X-Accel-Buffering": {"schema": {"type": "string", "enum": ["no"]}},
                },
                "content": {
                    "text/event-stream": {
                        "schema": {
                            "type": "string",
                            "description": "SSE frames; each `data:` line is one "
                            "`#/components/schemas/Event` as JSON.",
                            "x-sse-data": ref("Event"),
                        },
                        "example": 'retry: 3000\n\ndata: {"seq":null,"session_id":"ses_…",'
                        '"type":"server.connected","time":"…","properties":{"connection_id":'
                        '"con_…","last_seq":3,"resumed":false}}\n\nid: 4\ndata: {"seq":4,…}\n\n',
                    }
                },
            },
            **{str(code): body for code, body in sorted(errors.items())},
        },
    }


STREAM_PATHS: dict[str, Callable[[], dict[str, Any]]] = {
    "/api/sessions/{session_id}/stream/": lambda: {"get": _stream_operation(session=True)},
    "/api/stream/": lambda: {"get": _stream_operation(session=False)},
}

def _operational_paths() -> dict[str, Any]:
    """The operational endpoints: plain Django views outside /api/, no credentials."""
    ok = {"type": "string", "enum": ["ok"]}
    return {
        "/healthz": {
            "get": {
                "operationId": "healthz",
                "summary": "The process is alive",
                "tags": ["operations"],
                "security": [],
                "responses": {
                    "200": {
                        "description": "Alive.",
                        "content": {"application/json": {"schema": _object({"status": ok})}},
                    }
                },
            }
        },
        "/readyz": {
            "get": {
                "operationId": "readyz",
                "summary": "The database and the channel layer are reachable",
                "tags": ["operations"],
                "security": [],
                "responses": {
                    "200": {
                        "description": "Ready.",
                        "content": {
                            "application/json": {
                                "schema": _object({"status": ok, "database": ok, "channel_layer": ok})
                            }
                        },
                    },
                    "503": error_response(
                        503, "`unavailable`: `details.failing` lists `database` and/or `channel_layer`."
                    ),
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics of this process",
                "description": "No authentication: expose it to your Prometheus only.",
                "tags": ["operations"],
                "security": [],
                "responses": {
                    "200": {
                        "description": "Prometheus text exposition format.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
    }


TAGS = [
    {"name": "auth", "description": "Tokens, stream tickets and sign-up."},
    {"name": "sessions", "description": "Sessions, their members, presence and health."},
    {"name": "messages", "description": "Posting messages (which start the agent) and aborting replies."},
    {"name": "permissions", "description": "Human-in-the-loop approval of tool calls."},
    {"name": "events", "description": "The event log: history, polling and custom publishing."},
    {"name": "document", "description": "The session's shared document (its live editing is the WebSocket `/ws/sessions/{id}/doc/`)."},
    {"name": "streams", "description": "Server-Sent Events (Channels consumers, not REST views)."},
    {"name": "schema", "description": "This description."},
    {"name": "operations", "description": "Liveness, readiness and metrics (outside /api/)."},
]

DESCRIPTION = """Live, shared AI-agent sessions over REST, Server-Sent Events and WebSocket.

Every non-2xx JSON response has one shape, the `Error` schema:
`{"error": {"code", "message", "details"}}`. Every event, on SSE, WebSocket and
`GET /api/sessions/{session_id}/events/`, is an `Event` envelope; the event types are its
`oneOf` branches, generated from the server's own declarations.

Authenticate with `Authorization: Bearer <access JWT>` (`POST /api/auth/token/`) or the
session cookie of the browser UI (unsafe methods also need `X-CSRFToken`). The stream
endpoints also take `?token=` or `?ticket=`. WebSocket (`/ws/sessions/{id}/`,
`/ws/stream/`) carries the same envelopes plus commands; `/ws/sessions/{id}/doc/` carries
the session's shared document in the y-websocket protocol; see `docs/API.md`.
"""


def postprocess(result: dict[str, Any], generator: Any, request: Any, public: bool) -> dict[str, Any]:
    """drf-spectacular postprocessing hook: components, stream paths, tags."""
    comps = result.setdefault("components", {})
    schemas = comps.setdefault("schemas", {})
    for name, schema in {**resource_components(), **copy.deepcopy(cached_components())}.items():
        if schemas.setdefault(name, schema) != schema:
            raise ValueError(f"Two definitions of the component {name}.")
    missing = referenced_components() - set(schemas)
    if missing:
        raise ValueError(f"The event declarations name undefined components: {sorted(missing)}")
    create = schemas.get("SessionCreateRequest", {}).get("properties", {}).get("agent")
    if create is not None:
        create["enum"] = registry.names()
    comps["schemas"] = dict(sorted(schemas.items()))
    security = comps.setdefault("securitySchemes", {})
    security.update(STREAM_SECURITY_SCHEMES)
    comps["securitySchemes"] = dict(sorted(security.items()))
    paths = result.setdefault("paths", {})
    for path, build in STREAM_PATHS.items():
        paths[path] = build()
    paths.update(_operational_paths())
    result["paths"] = dict(sorted(paths.items()))
    result["tags"] = TAGS
    result.setdefault("info", {})["description"] = DESCRIPTION
    return result


# ---------------------------------------------------------------- the schema and docs views

# Imported last: drf_spectacular.views reads DEFAULT_GENERATOR_CLASS (this module) when
# it is first imported.
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView  # noqa: E402


class SchemaView(SpectacularAPIView):
    """``GET /api/schema/``: YAML by default, JSON with ``?format=json`` or
    ``Accept: application/json``. Public."""

    generator_class = TandemSchemaGenerator

    @doc(
        operation_id="schema_retrieve",
        summary="This OpenAPI description",
        description="OpenAPI 3 for the whole API. YAML (`application/vnd.oai.openapi`) by "
        "default; JSON with `?format=json` or `Accept: application/vnd.oai.openapi+json` "
        "(or `application/json`). Public.",
        tags=["schema"],
        parameters=[
            OpenApiParameter(
                "format", str, OpenApiParameter.QUERY, enum=["json", "yaml"],
                description="Overrides the `Accept` header.",
            )
        ],
        responses={200: OpenApiResponse({"type": "object", "additionalProperties": True},
                                        description="The OpenAPI document.")},
        errors={404: "`not_found`: an unknown `format`."},
        auth=[],
    )
    def get(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        return super().get(request, *args, **kwargs)  # type: ignore[no-untyped-call]


class SwaggerView(SpectacularSwaggerView):
    """``GET /api/docs/``: Swagger UI, from local assets (drf-spectacular-sidecar). Not
    Redoc: drf-spectacular's Redoc page loads web fonts and a logo from CDNs."""

    url_name = "api-schema"
    schema = None  # an HTML page, not part of the API it describes
