"""Tandem as an MCP server: the tools an outside agent (Claude Code, opencode, Cursor…)
uses to work in Tandem's sessions as one user. Served over stdio by
``manage.py mcp_server`` and over streamable HTTP at ``/mcp/`` (project/asgi.py); both
build the same server here, differing only in how a call finds its user.

Every tool calls the same access checks and services as the REST views, so roles,
validation, limits and events are exactly theirs; a refusal comes back as an error
result whose text (and structured content) is the API's one error shape. Non-members
get ``not_found``, as over REST.
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import orjson
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import User
from django.utils import timezone
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp_types import CallToolResult, TextContent
from pydantic import Field
from rest_framework import exceptions as drf

from events_app import groups
from events_app.fanout import get_hub
from events_app.services import publish_custom
from events_app.types import Frame
from project import runtime
from project.auth import authenticate_stream
from project.db import off_loop
from project.errors import (
    ApiError,
    AuthenticationFailed,
    InternalError,
    NotAuthenticated,
    NotFound,
    to_api_error,
)
from project.limits import check_write_rate
from sessions_app import doc as docs
from sessions_app import permissions, services
from sessions_app.access import role_in, session_for
from sessions_app.models import Membership, Message, PermissionRequest, Role, Session
from sessions_app.serializers import (
    DocPatchSerializer,
    EventPublishSerializer,
    MessagePostSerializer,
    document_data,
    message_data,
    permission_data,
    posted_data,
    session_data,
)

# A call's user: from the stdio server's token, or from the HTTP request's.
Identify = Callable[[Context], Awaitable[int]]

INSTRUCTIONS = (
    "Tandem: shared sessions where people and an agent talk. You act as one Tandem user. "
    "list_sessions shows the sessions you are a member of; read_messages reads one; "
    "post_message writes to it (its agent replies); publish_event sends a custom event "
    "such as task.progress; request_approval asks the session's people a yes/no question "
    "and waits for their answer; read_doc and edit_doc read and change the session's shared "
    "document."
)
# How often a waiting request_approval rereads its request. With Redis, the answer's
# event wakes it at once from whichever process wrote the answer, and the rereads are only
# a fallback. Without Redis a stdio server shares no channel layer with the web process
# where people answer, so the rereads are how it finds the answer.
APPROVAL_POLL_SECONDS = 0.5
APPROVAL_RECHECK_SECONDS = 5.0
MAX_READ = 200

SessionId = Annotated[str, Field(description="The session's id (from list_sessions).", max_length=64)]


def build(identify: Identify) -> MCPServer:
    server: MCPServer = MCPServer("tandem", instructions=INSTRUCTIONS, log_level="WARNING")

    @server.tool(description="The sessions you are a member of, newest activity first, with your role in each.")
    async def list_sessions(
        ctx: Context,
        limit: Annotated[int, Field(ge=1, le=MAX_READ, description="At most this many.")] = 50,
    ) -> CallToolResult:
        return await _answer(ctx, identify, _list_sessions, limit)

    @server.tool(
        description="A session's messages, oldest first: the last `limit` of them, or those "
        "after the message `after`. Each has its author, status and parts (text, reasoning, tools)."
    )
    async def read_messages(
        ctx: Context,
        session_id: SessionId,
        limit: Annotated[int, Field(ge=1, le=MAX_READ, description="At most this many.")] = 50,
        after: Annotated[str | None, Field(description="Only messages after this message id.", max_length=64)] = None,
    ) -> CallToolResult:
        return await _answer(ctx, identify, _read_messages, session_id, limit, after)

    @server.tool(
        description="Post a message to a session as you (editors and owners). The session's "
        "agent replies to it; read_messages shows the reply."
    )
    async def post_message(
        ctx: Context,
        session_id: SessionId,
        text: Annotated[str, Field(description="The message.")],
        if_busy: Annotated[
            str, Field(description="While a reply runs: queue (default), reject or interrupt.")
        ] = "queue",
    ) -> CallToolResult:
        return await _answer(ctx, identify, _post_message, session_id, text, if_busy)

    @server.tool(
        description="Publish a custom event to a session (editors and owners), e.g. type "
        "`task.progress` with properties {\"percent\": 40, \"note\": \"tests pass\"}. Every "
        "member's stream receives it; the server adds published_by."
    )
    async def publish_event(
        ctx: Context,
        session_id: SessionId,
        type: Annotated[str, Field(description="Lowercase words joined by dots, e.g. task.progress.")],
        properties: Annotated[dict[str, Any] | None, Field(description="A JSON object.")] = None,
    ) -> CallToolResult:
        return await _answer(ctx, identify, _publish_event, session_id, type, properties or {})

    @server.tool(
        description="Ask the session's people a question and wait for their answer: Approve "
        "or Reject, as for any permission request in Tandem. The first answer wins; no answer "
        "before the timeout counts as rejected. Editors and owners. Returns approved "
        "(true/false), status (approved, rejected or expired), reason and resolved_by."
    )
    async def request_approval(
        ctx: Context,
        session_id: SessionId,
        question: Annotated[str, Field(description="What you want approved, in a sentence or two.")],
        details: Annotated[
            dict[str, Any] | None, Field(description="Anything that helps them decide (a JSON object).")
        ] = None,
        timeout_seconds: Annotated[
            float | None, Field(description="Give up after this long; at most the server's permission timeout.")
        ] = None,
    ) -> CallToolResult:
        return await _answer(
            ctx, identify, _request_approval, session_id, question, details, timeout_seconds
        )

    @server.tool(
        description="The session's shared document: its text (Markdown) and version. Any member."
    )
    async def read_doc(ctx: Context, session_id: SessionId) -> CallToolResult:
        return await _answer(ctx, identify, _read_doc, session_id)

    @server.tool(
        description="Edit the session's shared document (editors and owners). `edits` apply in "
        "order, all or none: each {at, delete?, insert?} with positions in Unicode code points "
        "of the text as the edits before it left it. Pass the `version` you read to refuse the "
        "edit (version_conflict) if someone changed the document since. Returns the new text "
        "and version."
    )
    async def edit_doc(
        ctx: Context,
        session_id: SessionId,
        edits: Annotated[
            list[dict[str, Any]],
            Field(description='e.g. [{"at": 0, "insert": "# Plan\\n"}, {"at": 10, "delete": 3}]'),
        ],
        version: Annotated[int | None, Field(description="The version the edits were made against.")] = None,
    ) -> CallToolResult:
        return await _answer(ctx, identify, _edit_doc, session_id, edits, version)

    return server


async def _answer(ctx: Context, identify: Identify, tool: Callable[..., Awaitable[Any]], *args: Any) -> CallToolResult:
    """A tool's result, or the API's error shape as an error result."""
    try:
        user = await off_loop(_active_user)(await identify(ctx))
        data = await tool(user, *args)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        err = exc if isinstance(exc, ApiError) else to_api_error(exc)
        if err is None:
            raise  # a bug: the SDK logs it and answers with an error result
        return _result(err.body(), error=True)
    return _result(data)


def _result(data: dict[str, Any], *, error: bool = False) -> CallToolResult:
    text = orjson.dumps(data).decode()
    return CallToolResult(
        content=[TextContent(type="text", text=text)], structured_content=data, is_error=error
    )


def _active_user(user_id: int) -> User:
    user = get_user_model().objects.filter(pk=user_id, is_active=True).first()
    if user is None:
        raise AuthenticationFailed("The user of these credentials is disabled or gone.")
    return user


# ---------------------------------------------------------------- the tools' work


async def _list_sessions(user: User, limit: int) -> dict[str, Any]:
    return await off_loop(_sessions_of)(user, limit)


def _sessions_of(user: User, limit: int) -> dict[str, Any]:
    roles = dict(Membership.objects.filter(user=user).values_list("session_id", "role"))
    # The REST list's order (Session.Meta.ordering: newest activity first).
    found = Session.objects.filter(pk__in=list(roles)).select_related("owner")[:limit]
    return {"sessions": [session_data(s, roles[s.id]) for s in found]}


async def _read_messages(user: User, session_id: str, limit: int, after: str | None) -> dict[str, Any]:
    return await off_loop(_messages_of)(user, session_id, limit, after)


def _messages_of(user: User, session_id: str, limit: int, after: str | None) -> dict[str, Any]:
    session, _ = session_for(user, session_id)
    messages = Message.objects.filter(session=session).select_related("author").prefetch_related("parts")
    if after is not None:
        anchor = Message.objects.filter(session=session, pk=after).first()
        if anchor is None:
            raise NotFound("No such message in this session.")
        page = list(messages.filter(turn_at__gt=anchor.turn_at).order_by("turn_at", "id")[:limit])
    else:
        page = list(messages.order_by("-turn_at", "-id")[:limit])[::-1]
    return {"session_id": session.id, "messages": [message_data(m) for m in page]}


async def _post_message(user: User, session_id: str, text: str, if_busy: str) -> dict[str, Any]:
    return await off_loop(_post)(user, session_id, text, if_busy)


def _post(user: User, session_id: str, text: str, if_busy: str) -> dict[str, Any]:
    role_in(user, session_id, Role.EDITOR)
    check_write_rate(user.pk)
    data = _validated(MessagePostSerializer, {"parts": [{"type": "text", "text": text}], "if_busy": if_busy})
    posted = services.post_message(session_id, user, data["parts"], data["if_busy"])
    return posted_data(posted.message, posted.reply, posted.position)


async def _publish_event(user: User, session_id: str, type_name: str, properties: dict[str, Any]) -> dict[str, Any]:
    return await off_loop(_publish)(user, session_id, type_name, properties)


def _publish(user: User, session_id: str, type_name: str, properties: dict[str, Any]) -> dict[str, Any]:
    session, _ = session_for(user, session_id, Role.EDITOR)
    check_write_rate(user.pk)
    data = _validated(EventPublishSerializer, {"type": type_name, "properties": properties})
    size = len(orjson.dumps({"type": type_name, "properties": properties}))
    frame = publish_custom(session.id, user, data["type"], data["properties"], body_bytes=size)
    envelope: dict[str, Any] = orjson.loads(frame.envelope)
    return envelope


async def _read_doc(user: User, session_id: str) -> dict[str, Any]:
    return await off_loop(_doc_of)(user, session_id)


def _doc_of(user: User, session_id: str) -> dict[str, Any]:
    session, _ = session_for(user, session_id)
    return document_data(docs.read_doc(session))


async def _edit_doc(user: User, session_id: str, edits: list[dict[str, Any]], version: int | None) -> dict[str, Any]:
    return await off_loop(_edit)(user, session_id, edits, version)


def _edit(user: User, session_id: str, edits: list[dict[str, Any]], version: int | None) -> dict[str, Any]:
    session, _ = session_for(user, session_id, Role.EDITOR)
    check_write_rate(user.pk)
    wanted: dict[str, Any] = {"edits": edits}
    if version is not None:
        wanted["version"] = version
    data = _validated(DocPatchSerializer, wanted)
    return document_data(docs.apply_edits(user, session, data["edits"], data.get("version")))


async def _request_approval(
    user: User, session_id: str, question: str, details: dict[str, Any] | None, timeout: float | None
) -> dict[str, Any]:
    permission = await off_loop(_ask)(user, session_id, question, details, timeout)
    try:
        decided = await _decision(permission)
    except asyncio.CancelledError:
        # The asking client went away (or cancelled the call): nobody waits for an
        # answer any more, so the question must not stay open in the browser.
        await asyncio.shield(off_loop(permissions.withdraw_approval)(permission.id))
        raise
    shown = permission_data(decided)
    return {
        "approved": decided.status == PermissionRequest.Status.APPROVED,
        "status": shown["status"],
        "reason": shown["reason"],
        "resolved_by": shown["resolved_by"],
        "permission_id": decided.id,
    }


def _ask(user: User, session_id: str, question: str, details: dict[str, Any] | None, timeout: float | None) -> PermissionRequest:
    session, _ = session_for(user, session_id, Role.EDITOR)
    check_write_rate(user.pk)
    return permissions.request_approval(session, user, question, details, timeout)


class _AnswerWatch:
    """A hub listener on the session's group: woken by its ``permission.resolved`` events,
    whichever process wrote the answer. It only wakes the waiter, which rereads the row."""

    wants_presence = False

    def __init__(self, permission_id: str) -> None:
        self.permission_id = permission_id
        self.woken = asyncio.Event()

    def deliver(self, frame: Frame) -> None:
        if frame.type == "permission.resolved" and self.permission_id in frame.envelope:
            self.woken.set()

    def control(self, message: groups.Control) -> None:
        pass


async def _decision(permission: PermissionRequest) -> PermissionRequest:
    """The request once answered or expired: woken by the answer's event, and reread
    periodically as well (the event may be lost with Redis, or not reach this process)."""
    hub = get_hub()
    group = groups.session_group(permission.session_id)
    watch = _AnswerWatch(permission.id)
    try:
        await hub.subscribe(group, watch)
        subscribed = True
    except Exception:  # Redis unreachable: the rereads alone find the answer
        subscribed = False
    every = APPROVAL_RECHECK_SECONDS if subscribed and settings.REDIS_URL else APPROVAL_POLL_SECONDS
    try:
        while True:
            # Reread after every wake: an answer committed before the subscription (or
            # between two reads) is in the row, and its event is published after commit.
            watch.woken.clear()
            current = await off_loop(permissions.permission_state)(permission.id)
            if current.status != PermissionRequest.Status.PENDING:
                return await off_loop(_with_resolver)(current.id)
            left = (current.expires_at - timezone.now()).total_seconds()
            if left <= 0:
                await off_loop(permissions.expire_permission)(permission.id)
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, every)):
                    await watch.woken.wait()
    finally:
        if subscribed:
            with contextlib.suppress(Exception):  # Redis away: the hub has let go already
                await hub.unsubscribe(group, watch)


def _with_resolver(permission_id: str) -> PermissionRequest:
    return PermissionRequest.objects.select_related("resolved_by").get(pk=permission_id)


def _validated(serializer_class: type, data: Any) -> dict[str, Any]:
    serializer = serializer_class(data=data)
    if not serializer.is_valid():
        err = to_api_error(drf.ValidationError(serializer.errors))
        raise err if err is not None else InternalError()
    return serializer.validated_data  # type: ignore[no-any-return]


# ---------------------------------------------------------------- streamable HTTP: /mcp/

USER_KEY = "tandem.mcp_user_id"  # put in the ASGI scope by HttpEndpoint


async def _identify_request(ctx: Context) -> int:
    """The user HttpEndpoint authenticated: the SDK hands each tool the HTTP request it
    came in, with the scope HttpEndpoint passed on."""
    scope = getattr(ctx.request_context.request, "scope", None) or {}
    user_id = scope.get(USER_KEY)
    if not isinstance(user_id, int):
        raise AuthenticationFailed()
    return user_id


class HttpEndpoint:
    """``/mcp/``: MCP's streamable HTTP transport behind the API's Bearer JWT. A request
    without valid credentials gets 401 in the error shape (``WWW-Authenticate: Bearer``)
    before the SDK sees it. Stateless (each request stands alone, answered as JSON), so
    any server process can take any request, and a request_approval holds only its own
    request open while it waits."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        try:
            if not any(key == b"authorization" for key, _ in scope.get("headers", [])):
                raise NotAuthenticated("Send 'Authorization: Bearer <access token>'.")
            credentials = await off_loop(authenticate_stream)(scope, allow_cookie=False)
        except ApiError as err:
            await _refuse(send, err)
            return
        manager = await _MANAGER.get().ready()
        await manager.handle_request({**scope, USER_KEY: credentials.user.pk}, receive, send)


async def _refuse(send: Any, err: ApiError) -> None:
    headers = [(b"content-type", b"application/json"), (b"www-authenticate", b'Bearer realm="api"')]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": orjson.dumps(err.body())})


class _Manager:
    """The SDK's session manager runs in a task of its own for the process's life: it
    owns the task group every request's server runs in."""

    def __init__(self, rt: runtime.Runtime) -> None:
        server = build(_identify_request)
        # Building the SDK's own app creates its session manager with these settings; the
        # app itself is not used (the manager is the documented way to mount elsewhere).
        server.streamable_http_app(
            json_response=True, stateless_http=True,
            max_request_body_size=settings.DATA_UPLOAD_MAX_MEMORY_SIZE,
        )
        self.manager = server.session_manager
        self.started = asyncio.Event()
        rt.spawn(self._run(), name="mcp session manager")

    async def _run(self) -> None:
        async with self.manager.run():
            self.started.set()
            await asyncio.Event().wait()

    async def ready(self) -> StreamableHTTPSessionManager:
        await self.started.wait()
        return self.manager


_MANAGER = runtime.Component("mcp http", _Manager)
