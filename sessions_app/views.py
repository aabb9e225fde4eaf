"""Thin REST views: validate with a serializer, call one service, return."""
from __future__ import annotations

import base64
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlencode

import orjson
from django.conf import settings
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import HttpResponse
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse
from rest_framework import exceptions as drf_exceptions
from rest_framework import status
from rest_framework.negotiation import BaseContentNegotiation
from rest_framework.pagination import CursorPagination
from rest_framework.parsers import BaseParser
from rest_framework.permissions import AllowAny
from rest_framework.renderers import BaseRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from events_app import presence
from events_app.types import ref
from project.auth import by_api_key, caller, issue_ticket, key_of
from project.errors import BadRequest, PermissionDenied, ValidationFailed
from project.limits import AuthThrottle
from project.openapi import (
    KEY_ID,
    MESSAGE_ID,
    MESSAGE_PAGE_PARAMETERS,
    PAGE_PARAMETERS,
    PERMISSION_ID,
    SESSION_ID,
    USERNAME,
    doc,
    json_body,
)
from sessions_app import doc as docs
from sessions_app import permissions, runs, search, services
from sessions_app.access import role_in, session_for
from sessions_app.models import Membership, Message, Role, Session
from sessions_app.serializers import (
    SEARCH_MAX_CHARS,
    AbortResultSerializer,
    ApiKeyCreatedSerializer,
    ApiKeyCreateSerializer,
    ApiKeyListSerializer,
    CredentialsSerializer,
    DocPatchSerializer,
    ExportQuerySerializer,
    ForkSerializer,
    HealthSerializer,
    MemberAddSerializer,
    MessageListQuerySerializer,
    MessagePostSerializer,
    PermissionListQuerySerializer,
    PermissionReplySerializer,
    PresenceSerializer,
    RetryResultSerializer,
    SearchQuerySerializer,
    SessionCreateSerializer,
    SessionUpdateSerializer,
    TicketSerializer,
    document_data,
    member_data,
    message_data,
    out,
    permission_data,
    posted_data,
    session_data,
    user_data,
)


def validated(serializer_class: type, data: Any) -> dict[str, Any]:
    serializer = serializer_class(data=data)
    serializer.is_valid(raise_exception=True)
    return serializer.validated_data  # type: ignore[no-any-return]


class Page(CursorPagination):
    """Every paginated list: ``{"results": [...], "next": url or null}``."""

    page_size = 50
    max_page_size = 200
    page_size_query_param = "limit"

    def get_paginated_response(self, data: Any) -> Response:
        return Response({"results": data, "next": self.get_next_link()})

    def paginate_queryset(self, queryset: Any, request: Any, view: Any = None) -> Any:
        # A cursor that does not decode, or decodes to a position the ordering field
        # cannot hold, is a bad query parameter (400), not a 404 or a 500.
        try:
            return super().paginate_queryset(queryset, request, view)
        except (drf_exceptions.NotFound, DjangoValidationError, ValueError, TypeError, OverflowError):
            raw = request.query_params.get(self.cursor_query_param, "")
            raise BadRequest("The cursor is not valid.", details={"cursor": raw[:40]}) from None


class SessionPage(Page):
    ordering = ("-last_activity_at", "-created_at")


class MessagePage(Page):
    ordering = ("turn_at", "id")


# ---------------------------------------------------------------- auth


class RegisterView(APIView):
    permission_classes = [AllowAny]
    authentication_classes: list[type] = []
    throttle_classes = [AuthThrottle]

    @doc(
        summary="Sign up",
        tags=["auth"],
        request=CredentialsSerializer,
        responses={201: OpenApiResponse(ref("User"), description="The new user.")},
        errors={
            400: "`bad_request` (malformed JSON) or `validation_error`: a username outside "
            "Django's rules (at most 150 letters, digits and `@.+-_`) or taken, a password "
            "Django's validators refuse, or an unknown field.",
            403: "`permission_denied`: sign-up is disabled (`TANDEM_ALLOW_SIGNUP=false`).",
        },
    )
    def post(self, request: Request) -> Response:
        if not settings.TANDEM_ALLOW_SIGNUP:
            raise PermissionDenied("Sign-up is disabled on this server.")
        data = validated(CredentialsSerializer, request.data)
        user = services.create_user(data["username"], data["password"])
        return Response(user_data(user), status=status.HTTP_201_CREATED)


class TicketView(APIView):
    throttle_classes = [AuthThrottle]

    @doc(
        summary="A short-lived stream ticket",
        description="A ticket for the caller, accepted as `?ticket=` on the stream endpoints "
        "until it expires (`expires_in` seconds); reusable in that time, so `EventSource`'s "
        "own reconnects work.",
        tags=["auth"],
        request=json_body(ref("EmptyRequest")),
        responses={200: OpenApiResponse(ref("Ticket"), description="The ticket.")},
    )
    def post(self, request: Request) -> Response:
        if request.data:  # parsing also refuses malformed JSON and other media types
            raise ValidationFailed(details={k: ["Unknown field."] for k in request.data})
        ticket = issue_ticket(caller(request).pk, key_of(request))
        return Response(out(TicketSerializer, {"ticket": ticket, "expires_in": settings.TANDEM_TICKET_SECONDS}))


def _signed_in(request: Request) -> User:
    """The caller, signed in with a password's credential (an access token or the
    session cookie), not with an API key: a leaked key must not be able to make keys that
    outlive its revocation."""
    if by_api_key(request):
        raise PermissionDenied("API keys cannot manage API keys: use an access token or sign in.")
    return caller(request)


class ApiKeyListView(APIView):
    @doc(
        operation_id="auth_keys_list",
        summary="Your API keys",
        description="The caller's API keys, oldest first: names and prefixes, never the keys.",
        tags=["auth"],
        responses={200: OpenApiResponse(ref("ApiKeyList"), description="The keys.")},
        errors={403: "`permission_denied`: the request was authenticated by an API key."},
    )
    def get(self, request: Request) -> Response:
        return Response(out(ApiKeyListSerializer, {"keys": services.list_api_keys(_signed_in(request))}))

    @doc(
        summary="Make an API key",
        description="A long-lived key for a program (an MCP client's configuration, a "
        "script), accepted as `Authorization: Bearer tdm_…` wherever an access token is "
        "accepted in that header; never in a query string. The key is in this answer only: "
        "Tandem stores its digest. It stays valid until deleted, or until its user is "
        "deactivated or deleted.",
        tags=["auth"],
        request=ApiKeyCreateSerializer,
        responses={201: OpenApiResponse(ref("ApiKeyCreated"), description="The key, shown once.")},
        errors={
            403: "`permission_denied`: the request was authenticated by an API key.",
            409: "`conflict`: the caller already holds the most keys a user may (50).",
        },
    )
    def post(self, request: Request) -> Response:
        data = validated(ApiKeyCreateSerializer, request.data)
        key, raw = services.create_api_key(_signed_in(request), data["name"])
        shown = {
            "id": key.id, "name": key.name, "prefix": key.prefix, "created_at": key.created_at,
            "last_used_at": key.last_used_at, "key": raw,
        }
        return Response(out(ApiKeyCreatedSerializer, shown), status=status.HTTP_201_CREATED)


class ApiKeyDetailView(APIView):
    @doc(
        summary="Revoke an API key",
        description="Deleted at once: the key's next request is refused with 401, and every "
        "stream it opened ends (WebSocket close 4401, reason `key_revoked`).",
        tags=["auth"],
        parameters=[KEY_ID],
        responses={204: OpenApiResponse(description="Revoked.")},
        errors={
            403: "`permission_denied`: the request was authenticated by an API key.",
            404: "`not_found`: no such key among the caller's.",
        },
    )
    def delete(self, request: Request, key_id: str) -> Response:
        services.revoke_api_key(_signed_in(request), key_id)
        return Response(status=status.HTTP_204_NO_CONTENT)


# ---------------------------------------------------------------- sessions


class SessionListView(APIView):
    @doc(
        operation_id="sessions_list",
        summary="Your sessions",
        description="Sessions the caller is a member of, newest activity first, cursor-paginated.",
        tags=["sessions"],
        parameters=PAGE_PARAMETERS,
        responses={200: OpenApiResponse(ref("SessionPage"), description="A page of sessions.")},
        errors={400: "`bad_request`: a `cursor` the server did not make."},
    )
    def get(self, request: Request) -> Response:
        memberships = {
            m.session_id: m.role for m in Membership.objects.filter(user=caller(request))
        }
        sessions = Session.objects.filter(pk__in=list(memberships)).select_related("owner")
        paginator = SessionPage()
        page = paginator.paginate_queryset(sessions, request, view=self) or []
        return paginator.get_paginated_response(
            [session_data(s, memberships[s.id]) for s in page]
        )

    @doc(
        summary="Create a session",
        description="The caller becomes its owner. Publishes `session.created`.",
        tags=["sessions"],
        request=SessionCreateSerializer,
        responses={201: OpenApiResponse(ref("Session"), description="The new session.")},
    )
    def post(self, request: Request) -> Response:
        data = validated(SessionCreateSerializer, request.data)
        session = services.create_session(caller(request), title=data["title"], agent=data["agent"])
        return Response(session_data(session, Role.OWNER), status=status.HTTP_201_CREATED)


class SessionDetailView(APIView):
    @doc(
        summary="One session",
        tags=["sessions"],
        parameters=[SESSION_ID],
        responses={200: OpenApiResponse(ref("Session"), description="The session.")},
        errors={404: "`not_found`: no such session, or you are not a member of it."},
    )
    def get(self, request: Request, session_id: str) -> Response:
        session, role = session_for(caller(request), session_id)
        return Response(session_data(session, role))

    @doc(
        summary="Rename a session",
        description="Owner only. Publishes `session.updated`.",
        tags=["sessions"],
        parameters=[SESSION_ID],
        request=SessionUpdateSerializer,
        responses={200: OpenApiResponse(ref("Session"), description="The session.")},
        errors={
            403: "`permission_denied`: only the owner renames a session.",
            404: "`not_found`: no such session, or you are not a member of it.",
        },
    )
    def patch(self, request: Request, session_id: str) -> Response:
        session, role = session_for(caller(request), session_id, Role.OWNER)
        data = validated(SessionUpdateSerializer, request.data)
        session = services.update_session(session, title=data["title"])
        return Response(session_data(session, role))

    @doc(
        summary="Delete a session",
        description="Owner only. Its streams get `session.deleted` and end.",
        tags=["sessions"],
        parameters=[SESSION_ID],
        responses={204: OpenApiResponse(description="Deleted.")},
        errors={
            403: "`permission_denied`: only the owner deletes a session.",
            404: "`not_found`: no such session, or you are not a member of it.",
        },
    )
    def delete(self, request: Request, session_id: str) -> Response:
        session, _ = session_for(caller(request), session_id, Role.OWNER)
        services.delete_session(session)
        return Response(status=status.HTTP_204_NO_CONTENT)


class MemberListView(APIView):
    @doc(
        operation_id="sessions_members_list",
        summary="The session's members",
        description="Oldest first; a plain array.",
        tags=["sessions"],
        parameters=[SESSION_ID],
        responses={200: OpenApiResponse({"type": "array", "items": ref("Member")}, description="The members.")},
        errors={404: "`not_found`: no such session, or you are not a member of it."},
    )
    def get(self, request: Request, session_id: str) -> Response:
        session, _ = session_for(caller(request), session_id)
        rows = Membership.objects.filter(session=session).select_related("user").order_by("created_at")
        return Response([member_data(m) for m in rows])

    @doc(
        summary="Add a member",
        description="Owner only. Publishes `member.added`.",
        tags=["sessions"],
        parameters=[SESSION_ID],
        request=MemberAddSerializer,
        responses={201: OpenApiResponse(ref("Member"), description="The new member.")},
        errors={
            400: "`bad_request` (malformed JSON) or `validation_error`: no such active user, "
            "a bad role, or an unknown field.",
            403: "`permission_denied`: only the owner manages members.",
            404: "`not_found`: no such session, or you are not a member of it.",
            409: "`conflict`: the user is already a member.",
        },
    )
    def post(self, request: Request, session_id: str) -> Response:
        session, _ = session_for(caller(request), session_id, Role.OWNER)
        data = validated(MemberAddSerializer, request.data)
        membership = services.add_member(session, username=data["username"], role=data["role"])
        return Response(member_data(membership), status=status.HTTP_201_CREATED)


class MemberDetailView(APIView):
    @doc(
        summary="Remove a member",
        description="Owner only. Publishes `member.removed` and closes that user's streams "
        "of the session.",
        tags=["sessions"],
        parameters=[SESSION_ID, USERNAME],
        responses={204: OpenApiResponse(description="Removed.")},
        errors={
            400: "`bad_request`: the owner cannot be removed.",
            403: "`permission_denied`: only the owner manages members.",
            404: "`not_found`: no such session (or you are not a member), or that user is "
            "not a member.",
        },
    )
    def delete(self, request: Request, session_id: str, username: str) -> Response:
        session, _ = session_for(caller(request), session_id, Role.OWNER)
        services.remove_member(session, username=username)
        return Response(status=status.HTTP_204_NO_CONTENT)


class PresenceView(APIView):
    @doc(
        operation_id="sessions_presence_list",
        summary="Who is connected now",
        description="One row per user, sorted by username, across all server processes. "
        "Only session streams count.",
        tags=["sessions"],
        parameters=[SESSION_ID],
        responses={200: OpenApiResponse({"type": "array", "items": ref("Presence")}, description="Who is here.")},
        errors={
            404: "`not_found`: no such session, or you are not a member of it.",
            503: "`unavailable`: Redis, which holds presence, is unreachable; retry after `Retry-After`.",
        },
    )
    def get(self, request: Request, session_id: str) -> Response:
        session, _ = session_for(caller(request), session_id)
        return Response(out(PresenceSerializer, presence.summary(session.id), many=True))


class HealthView(APIView):
    @doc(
        summary="The session's status, head and running reply",
        tags=["sessions"],
        parameters=[SESSION_ID],
        responses={200: OpenApiResponse(ref("Health"), description="The session's health.")},
        errors={404: "`not_found`: no such session, or you are not a member of it."},
    )
    def get(self, request: Request, session_id: str) -> Response:
        session, _ = session_for(caller(request), session_id)
        return Response(
            out(
                HealthSerializer,
                {
                    "status": session.status,
                    "last_seq": session.last_seq,
                    "connections": presence.connection_count(session.id),
                    "run": runs.current_run(session.id),
                },
            )
        )


# ---------------------------------------------------------------- messages


class MessageListView(APIView):
    @doc(
        operation_id="sessions_messages_list",
        summary="The session's messages",
        description="Oldest first (in the order of their turns), cursor-paginated; queued "
        "messages end the last page, in posting order. `latest=true` gives the last page "
        "first and `before` the page before a message: read back by following `previous`.",
        tags=["messages"],
        parameters=[SESSION_ID, *PAGE_PARAMETERS, *MESSAGE_PAGE_PARAMETERS],
        responses={200: OpenApiResponse(ref("MessagePage"), description="A page of messages.")},
        errors={
            400: "`bad_request`: a `cursor` the server did not make; `validation_error`: "
            "`before` is not a message of the session that has taken its turn, `latest` "
            "is not a boolean, more than one of `cursor`, `before` and `latest`, or an "
            "unknown parameter.",
            404: "`not_found`: no such session, or you are not a member of it.",
        },
    )
    def get(self, request: Request, session_id: str) -> Response:
        session, _ = session_for(caller(request), session_id)
        query = validated(MessageListQuerySerializer, request.query_params.dict())
        paginator = MessagePage()
        if query["latest"] or query.get("before"):
            limit = paginator.get_page_size(request) or paginator.page_size
            page, more = services.messages_before(session, query.get("before"), limit)
            previous = None
            if more:
                params = {"before": page[0].pk, "limit": str(limit)}
                previous = request.build_absolute_uri(f"{request.path}?{urlencode(params)}")
            return Response({"results": [message_data(m) for m in page], "next": None, "previous": previous})
        messages = Message.objects.filter(session=session).select_related("author").prefetch_related("parts")
        page = list(paginator.paginate_queryset(messages.exclude(status=Message.Status.QUEUED), request, view=self) or [])
        if paginator.get_next_link() is None:
            # The queue (at most TANDEM_MAX_QUEUED) ends the last page, in posting order.
            page += messages.filter(status=Message.Status.QUEUED).order_by("turn_at", "id")
        return Response({
            "results": [message_data(m) for m in page],
            "next": paginator.get_next_link(),
            "previous": paginator.get_previous_link(),
        })

    @doc(
        summary="Post a message",
        description="Editors and owners. Starts the session's agent; the reply streams as "
        "events (`message.created`, `message.part.updated`…, `message.completed`).",
        tags=["messages"],
        parameters=[SESSION_ID],
        request=MessagePostSerializer,
        responses={
            202: OpenApiResponse(ref("MessagePosted"), description="Accepted: the user's message and the reply's id.")
        },
        errors={
            403: "`permission_denied`: viewers cannot post.",
            404: "`not_found`: no such session, or you are not a member of it.",
            400: "`validation_error`: `if_busy` is not `queue`, `reject` or `interrupt`.",
            409: "`session_busy`: a reply is streaming and `if_busy` is `reject`; "
            "`queue_full`: `TANDEM_MAX_QUEUED` messages are already waiting.",
            413: "`payload_too_large`: the text parts hold more than "
            "`TANDEM_MAX_MESSAGE_CHARS` characters in total, or the body is too large.",
        },
    )
    def post(self, request: Request, session_id: str) -> Response:
        role_in(caller(request), session_id, Role.EDITOR)
        data = validated(MessagePostSerializer, request.data)
        posted = services.post_message(session_id, caller(request), data["parts"], data["if_busy"])
        return Response(
            posted_data(posted.message, posted.reply, posted.position, posted.data), status=status.HTTP_202_ACCEPTED
        )


class MessageDetailView(APIView):
    @doc(
        operation_id="sessions_messages_withdraw",
        summary="Withdraw a queued message",
        description="Its author or an owner. Publishes `message.removed`.",
        tags=["messages"],
        parameters=[SESSION_ID, MESSAGE_ID],
        responses={204: OpenApiResponse(description="Withdrawn.")},
        errors={
            403: "`permission_denied`: viewers, and editors withdrawing someone else's message.",
            404: "`not_found`: no such session (or you are not a member), or no such message in it.",
            409: "`not_queued`: the message is no longer queued (its turn came).",
        },
    )
    def delete(self, request: Request, session_id: str, message_id: str) -> Response:
        session, role = session_for(caller(request), session_id, Role.EDITOR)
        services.withdraw_message(session, caller(request), role, message_id)
        return Response(status=status.HTTP_204_NO_CONTENT)


class RetryView(APIView):
    @doc(
        operation_id="sessions_messages_retry",
        summary="Retry the latest reply",
        description="Editors and owners. A new reply to the same user message; the old reply "
        "stays, with `superseded_by` (published as `message.updated`).",
        tags=["messages"],
        parameters=[SESSION_ID, MESSAGE_ID],
        request=json_body(ref("EmptyRequest")),
        responses={202: OpenApiResponse(ref("RetryResult"), description="Accepted: the new reply's id.")},
        errors={
            400: "`bad_request`: the message is a user's message, not a reply.",
            403: "`permission_denied`: viewers cannot retry.",
            404: "`not_found`: no such session (or you are not a member), or no such message in it.",
            409: "`session_busy`: a reply is running or messages are queued; `not_latest`: "
            "the message is not the session's latest reply.",
        },
    )
    def post(self, request: Request, session_id: str, message_id: str) -> Response:
        session, _ = session_for(caller(request), session_id, Role.EDITOR)
        if request.data:
            raise ValidationFailed(details={k: ["Unknown field."] for k in request.data})
        reply = services.retry_reply(session, message_id)
        return Response(out(RetryResultSerializer, {"reply_id": reply.pk}), status=status.HTTP_202_ACCEPTED)


class AbortView(APIView):
    @doc(
        summary="Stop the running reply",
        description="Editors and owners. The reply ends `cancelled` within a second.",
        tags=["messages"],
        parameters=[SESSION_ID],
        request=json_body(ref("EmptyRequest")),
        responses={200: OpenApiResponse(ref("AbortResult"), description="Whether a reply was running.")},
        errors={403: "`permission_denied`: viewers cannot abort.", 404: "`not_found`: no such session, or you are not a member of it."},
    )
    def post(self, request: Request, session_id: str) -> Response:
        session, _ = session_for(caller(request), session_id, Role.EDITOR)
        if request.data:
            raise ValidationFailed(details={k: ["Unknown field."] for k in request.data})
        return Response(out(AbortResultSerializer, {"aborted": services.abort(session, caller(request))}))


# ---------------------------------------------------------------- permissions


class PermissionListView(APIView):
    @doc(
        operation_id="sessions_permissions_list",
        summary="The session's permission requests",
        description="Oldest first; a plain array.",
        tags=["permissions"],
        parameters=[
            SESSION_ID,
            OpenApiParameter(
                "status", str, OpenApiParameter.QUERY,
                enum=["pending", "approved", "rejected", "expired"],
                description="Only requests in this state.",
            ),
        ],
        responses={200: OpenApiResponse({"type": "array", "items": ref("Permission")}, description="The requests.")},
        errors={
            400: "`validation_error`: an unknown `status` or query parameter.",
            404: "`not_found`: no such session, or you are not a member of it.",
        },
    )
    def get(self, request: Request, session_id: str) -> Response:
        session, _ = session_for(caller(request), session_id)
        query = validated(PermissionListQuerySerializer, request.query_params.dict())
        found = permissions.list_permissions(session, query.get("status"))
        return Response([permission_data(p) for p in found])


class PermissionDetailView(APIView):
    @doc(
        operation_id="sessions_permissions_answer",
        summary="Answer a permission request",
        description="Editors and owners; the first answer wins. Publishes `permission.resolved`.",
        tags=["permissions"],
        parameters=[SESSION_ID, PERMISSION_ID],
        request=PermissionReplySerializer,
        responses={200: OpenApiResponse(ref("Permission"), description="The request, now `approved` or `rejected`.")},
        errors={
            403: "`permission_denied`: viewers cannot answer.",
            404: "`not_found`: no such session (or you are not a member), or no such request "
            "in this session.",
            409: "`already_resolved`: answered, expired or aborted; `details.permission` is "
            "its current state.",
        },
    )
    def post(self, request: Request, session_id: str, permission_id: str) -> Response:
        session, _ = session_for(caller(request), session_id, Role.EDITOR)
        data = validated(PermissionReplySerializer, request.data)
        permission = permissions.answer_permission(
            session, permission_id, caller(request), approved=data["approved"], reason=data["reason"]
        )
        return Response(permission_data(permission))


# ---------------------------------------------------------------- fork, export, search


class ForkView(APIView):
    @doc(
        summary="Fork a session",
        description="Any member. A new session owned by the caller, with the same agent, "
        "holding copies of the messages up to and including `message_id` (default: every "
        "ended one). Its event log starts with `session.created`, then one `message.created` "
        "per copied message (complete, with its parts).",
        tags=["sessions"],
        parameters=[SESSION_ID],
        request=ForkSerializer,
        responses={201: OpenApiResponse(ref("Session"), description="The new session, with `forked_from`.")},
        errors={
            400: "`bad_request` (malformed JSON) or `validation_error`: a field of the wrong "
            "type or too long, or an unknown field.",
            404: "`not_found`: no such session (or you are not a member), or no such message "
            "in it.",
            409: "`conflict`: that message is still streaming.",
        },
    )
    def post(self, request: Request, session_id: str) -> Response:
        source, _ = session_for(caller(request), session_id)
        data = validated(ForkSerializer, request.data)
        session = services.fork_session(
            source, caller(request), message_id=data.get("message_id"), title=data.get("title")
        )
        return Response(session_data(session, Role.OWNER), status=status.HTTP_201_CREATED)


class AnyFormatNegotiation(BaseContentNegotiation):
    """``?format=`` here names the export's format, not a DRF renderer: errors are JSON."""

    def select_renderer(self, request: Request, renderers: Iterable[BaseRenderer], format_suffix: str | None = None) -> Any:
        renderer = next(iter(renderers))
        return renderer, renderer.media_type

    def select_parser(self, request: Request, parsers: Iterable[BaseParser]) -> BaseParser | None:
        return next(iter(parsers), None)


class ExportView(APIView):
    content_negotiation_class = AnyFormatNegotiation

    @doc(
        summary="Export a session",
        description="Any member. `format=markdown` (default): a transcript as "
        "`text/markdown`; `format=json`: the session, members, messages (with parts) and "
        "permission requests. Either as an attachment (`Content-Disposition`).",
        tags=["sessions"],
        parameters=[
            SESSION_ID,
            OpenApiParameter(
                "format", str, OpenApiParameter.QUERY, enum=["markdown", "json"],
                description="`markdown` (default) or `json`.",
            ),
        ],
        responses={
            (200, "text/markdown"): OpenApiResponse({"type": "string"}, description="The transcript."),
            (200, "application/json"): OpenApiResponse(ref("Export"), description="The whole session."),
        },
        errors={
            400: "`validation_error`: an unknown `format` or query parameter.",
            404: "`not_found`: no such session, or you are not a member of it.",
        },
    )
    def get(self, request: Request, session_id: str) -> HttpResponse:
        session, role = session_for(caller(request), session_id)
        query = validated(ExportQuerySerializer, request.query_params.dict())
        data = services.export_data(session, role)
        if query["format"] == "json":
            body, content_type, ext = orjson.dumps(data), "application/json", "json"
        else:
            body, content_type, ext = services.export_markdown(data).encode(), "text/markdown; charset=utf-8", "md"
        response = HttpResponse(body, content_type=content_type)
        response["Content-Disposition"] = f'attachment; filename="tandem-{session.id}.{ext}"'
        return response


class SearchView(APIView):
    @doc(
        operation_id="search",
        summary="Search your sessions",
        description="Titles and message text of the sessions the caller is a member of, "
        "best match first. PostgreSQL: full-text search (English stemming; `websearch` "
        "syntax: `\"a phrase\"`, `-not`, `or`); other databases: a case-insensitive "
        "substring. Paginated; follow `next`.",
        tags=["sessions"],
        parameters=[
            OpenApiParameter(
                "q", {"type": "string", "minLength": 1, "maxLength": SEARCH_MAX_CHARS},
                OpenApiParameter.QUERY, required=True, description="What to look for.",
            ),
            OpenApiParameter(
                "cursor", str, OpenApiParameter.QUERY,
                description="Where the page starts: take it from the previous page's `next`.",
            ),
            OpenApiParameter(
                "limit", {"type": "integer", "minimum": 1, "maximum": 100}, OpenApiParameter.QUERY,
                description="Hits per page (default 20).",
            ),
        ],
        responses={200: OpenApiResponse(ref("SearchPage"), description="A page of hits.")},
        errors={400: "`validation_error`: `q` missing, blank or over 200 characters, a bad "
                "`limit`, or an unknown parameter; `bad_request`: a `cursor` the server did not make."},
    )
    def get(self, request: Request) -> Response:
        query = validated(SearchQuerySerializer, request.query_params.dict())
        offset = _search_offset(query.get("cursor"))
        hits, more = search.search(caller(request).pk, query["q"], offset=offset, limit=query["limit"])
        next_url = None
        if more:
            params = request.query_params.copy()
            params["cursor"] = _search_cursor(offset + len(hits))
            next_url = request.build_absolute_uri(f"{request.path}?{params.urlencode()}")
        return Response({"results": [h.to_json() for h in hits], "next": next_url})


def _search_cursor(offset: int) -> str:
    return base64.urlsafe_b64encode(f"o{offset}".encode()).decode().rstrip("=")


def _search_offset(cursor: str | None) -> int:
    if cursor is None:
        return 0
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        raw = ""
    if not (raw.startswith("o") and raw[1:].isascii() and raw[1:].isdigit() and len(raw) <= 8):
        raise BadRequest("The cursor is not valid.", details={"cursor": cursor[:40]})
    return int(raw[1:])


class DocumentView(APIView):
    @doc(
        summary="The shared document",
        description="Any member. The text of the session's shared document (PROTOCOL §10); "
        "a session whose document was never edited has `\"\"` at version 0.",
        tags=["document"],
        parameters=[SESSION_ID],
        responses={200: OpenApiResponse(ref("Document"), description="The document.")},
        errors={404: "`not_found`: no such session, or you are not a member of it."},
    )
    def get(self, request: Request, session_id: str) -> Response:
        session, _ = session_for(caller(request), session_id)
        return Response(document_data(docs.read_doc(session)))

    @doc(
        summary="Edit the shared document",
        description="Editors and owners. The edits are applied in order, as one change, "
        "positions in Unicode code points of the text at that moment; open editors see it "
        "at once, and `doc.updated` is published (coalesced).",
        tags=["document"],
        parameters=[SESSION_ID],
        request=DocPatchSerializer,
        responses={200: OpenApiResponse(ref("Document"), description="The document after the edits.")},
        errors={
            400: "`validation_error`: a position or length out of range (`details.edits`), "
            "a field missing, unknown or of the wrong type.",
            403: "`permission_denied`: viewers cannot edit.",
            404: "`not_found`: no such session, or you are not a member of it.",
            409: "`version_conflict`: `version` was given and the document has moved on "
            "(`details.version` is the current one); nothing was applied.",
            413: "`payload_too_large`: the text would be longer than `TANDEM_MAX_DOC_CHARS`.",
        },
    )
    def patch(self, request: Request, session_id: str) -> Response:
        user = caller(request)
        session, _ = session_for(user, session_id, Role.EDITOR)
        data = validated(DocPatchSerializer, request.data)
        state = docs.apply_edits(user, session, data["edits"], data.get("version"))
        return Response(document_data(state))
