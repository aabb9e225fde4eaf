"""The event log over REST: history for polling and catch-up, and custom publishing."""
from __future__ import annotations

import orjson
from django.http import HttpResponse
from drf_spectacular.utils import OpenApiResponse
from rest_framework import status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from events_app.services import history, parse_position, publish_custom
from events_app.types import TypeFilter, ref
from project.auth import caller
from project.errors import BadRequest
from project.openapi import EVENTS_PARAMETERS, SESSION_ID, doc
from sessions_app.access import session_for
from sessions_app.models import Role
from sessions_app.serializers import EventPublishSerializer

NOT_FOUND = "`not_found`: no such session, or you are not a member of it."


class EventListView(APIView):
    @doc(
        operation_id="sessions_events_list",
        summary="The event log after a position",
        description="The persisted events after `after`, oldest first: history, polling and "
        "catch-up. Each is an `Event` envelope. Any query parameter other than `after`, "
        "`limit` and `types` is `400 bad_request`.",
        tags=["events"],
        parameters=[SESSION_ID, *EVENTS_PARAMETERS],
        responses={200: OpenApiResponse(ref("EventPage"), description="A page of the log.")},
        errors={
            400: "`bad_request`: a non-integer `after` or `limit`, a `limit` out of range, a "
            "malformed `types`, or an unknown query parameter.",
            404: NOT_FOUND,
        },
    )
    def get(self, request: Request, session_id: str) -> HttpResponse:
        session, _ = session_for(caller(request), session_id)
        params = request.query_params
        unknown = set(params) - {"after", "limit", "types"}
        if unknown:
            raise BadRequest(f"Unknown parameters: {', '.join(sorted(unknown))}.")
        after = parse_position(params.get("after"), "after") or 0
        limit = parse_position(params.get("limit"), "limit")
        if limit is None:
            limit = 100
        if not 1 <= limit <= 1000:
            raise BadRequest("limit must be between 1 and 1000.", details={"limit": limit})
        try:
            type_filter = TypeFilter.parse(params.get("types"))
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        page = history(session.id, session.last_seq, after=after, limit=limit, type_filter=type_filter)
        return HttpResponse(page.to_json(), content_type="application/json")

    @doc(
        summary="Publish a custom event",
        description="Editors and owners (for example an external service sending "
        "`task.progress`). The server adds `published_by`. The event is persisted and "
        "streamed like any other.",
        tags=["events"],
        parameters=[SESSION_ID],
        request=EventPublishSerializer,
        responses={201: OpenApiResponse(ref("CustomEvent"), description="The event's envelope.")},
        errors={
            400: "`bad_request` (malformed JSON) or `validation_error`: a malformed or "
            "reserved `type`, `properties` not an object or containing `published_by`, or "
            "an unknown field.",
            403: "`permission_denied`: viewers cannot publish.",
            404: NOT_FOUND,
            413: "`payload_too_large`: the body or the encoded properties are over "
            "`TANDEM_MAX_EVENT_BYTES`.",
        },
    )
    def post(self, request: Request, session_id: str) -> Response:
        session, _ = session_for(caller(request), session_id, Role.EDITOR)
        serializer = EventPublishSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        frame = publish_custom(
            session.id, caller(request), data["type"], data["properties"],
            body_bytes=int(request.META.get("CONTENT_LENGTH") or 0),
        )
        return Response(orjson.loads(frame.envelope), status=status.HTTP_201_CREATED)
