"""Stream URLs, for both transports, and the ASGI middleware in front of them."""
from __future__ import annotations

from typing import Any

import orjson
from channels.security.websocket import WebsocketDenier
from django.urls import path, re_path

from events_app.consumers import SSEConsumer, StreamSocketConsumer
from events_app.docsocket import DocSocketConsumer
from project.auth import origin_allowed, read_stream_claim
from project.errors import ApiError, NotFound


def _has_origin(scope: dict[str, Any]) -> bool:
    return any(key == b"origin" for key, _ in scope.get("headers", []))


class StreamAuthMiddleware:
    """The one place a stream is authenticated: Bearer header, ``?token=``, ``?ticket=``
    or the session cookie. Puts ``scope["stream_auth"]`` — the credentials, or the
    ApiError to answer with — for the consumer, which must answer in its own transport's
    way (a JSON error for SSE, a 44xx close for WebSocket)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        # A WebSocket handshake without an Origin is not from a browser: a cookie there
        # proves nothing, only tokens and tickets count.
        allow_cookie = scope["type"] == "http" or _has_origin(scope)
        try:
            # The signature and expiry only: the user and the membership are checked in
            # one batch with every stream opening meanwhile (events_app.streams.prepare).
            auth: Any = read_stream_claim(scope, allow_cookie=allow_cookie)
        except ApiError as err:
            auth = err
        return await self.app({**scope, "stream_auth": auth}, receive, send)


class StreamOriginValidator:
    """Refuses (HTTP 403, before any credential is read) a WebSocket handshake whose
    Origin is not allowed; see ``origin_allowed``."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        if scope["type"] == "websocket" and not origin_allowed(scope):
            return await WebsocketDenier()(scope, receive, send)
        return await self.app(scope, receive, send)


# SSE streams authenticate inside ``streams.prepare``, in the same thread hop as the
# membership check (the same rules as StreamAuthMiddleware: header, token, ticket, cookie).
sse_urlpatterns = [
    path("api/sessions/<str:session_id>/stream/", SSEConsumer.as_asgi()),
    path("api/stream/", SSEConsumer.as_asgi()),
]

async def no_such_socket(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A WebSocket handshake on a path with no stream (``/ws/stream`` without its slash,
    an upgrade to ``/api/stream/``): refused before it is accepted, never an exception
    (Channels' router raises one, which servers turn into a 500 and a traceback). Where
    the server implements the ASGI WebSocket Denial Response extension (uvicorn) the
    answer is a ``404`` with the error shape; otherwise (daphne) it is a close before
    accept, which the server answers with ``403``."""
    message = await receive()
    if message["type"] != "websocket.connect":
        return  # the client left first
    err = NotFound("No stream at this path.")
    if "websocket.http.response" in (scope.get("extensions") or {}):
        await send({
            "type": "websocket.http.response.start", "status": err.status,
            "headers": [(b"content-type", b"application/json")],
        })
        await send({"type": "websocket.http.response.body", "body": orjson.dumps(err.body())})
    else:
        await send({"type": "websocket.close", "code": 4000 + err.status, "reason": err.code})

websocket_urlpatterns = [
    path("ws/sessions/<str:session_id>/", StreamSocketConsumer.as_asgi()),
    path("ws/stream/", StreamSocketConsumer.as_asgi()),
    path("ws/sessions/<str:session_id>/doc/", DocSocketConsumer.as_asgi()),
    re_path(r"", no_such_socket),  # type: ignore[arg-type]  # an ASGI app: see project/asgi.py
]
