"""SSE and WebSocket consumers. They only move data: the connection's decisions live in
``events_app.streams``, the commands' in ``events_app.commands``.

Neither consumer takes a channel-layer channel of its own: the process's hub delivers
frames to them directly, so an open stream costs no Redis subscription and no receive
loop. And neither runs ``aclose_old_connections`` per message (channels >= 4.2 does a
thread hop for it on every dispatch); they touch the ORM only through
``project.db.off_loop``, which manages connections itself.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from typing import Any

import orjson
from channels.generic.http import AsyncHttpConsumer
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings

from events_app import commands
from events_app.streams import Connection, prepare, serving
from project.errors import ApiError, BadRequest, InternalError
from project.thirdparty import daphne_sends_close_reasons

log = logging.getLogger(__name__)

try:  # what daphne's WebSocket library raises on a send after the client left
    from autobahn.exception import Disconnected as _Disconnected
except ImportError:  # pragma: no cover - daphne not installed
    class _Disconnected(Exception):  # type: ignore[no-redef]
        pass

# A client that went away mid-write: uvicorn raises ClientDisconnected (an OSError).
CLIENT_GONE: tuple[type[BaseException], ...] = (OSError, _Disconnected)

NO_LAYER = "tandem-no-layer"  # an alias that names no layer: no per-consumer channel

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]

def _allowed_origin(scope: dict[str, Any]) -> bytes | None:
    headers: list[tuple[bytes, bytes]] = scope.get("headers", [])
    origin = next((v for k, v in headers if k == b"origin"), None)
    if origin is None or origin.decode("latin-1") not in settings.CORS_ALLOWED_ORIGINS:
        return None
    return origin


def _cors_headers(scope: dict[str, Any]) -> list[tuple[bytes, bytes]]:
    """CORS for the SSE endpoints, which Django's CORS middleware never sees: only for
    the configured origins, the same list the REST API allows. Credentialed, so that
    ``new EventSource(url, {withCredentials: true})`` on an allowed origin authenticates
    by the session cookie on every one of its own reconnects (a ticket in the URL
    expires; the cookie lasts as long as the sign-in)."""
    origin = _allowed_origin(scope)
    if origin is None:
        return [(b"vary", b"origin")]
    return [
        (b"access-control-allow-origin", origin),
        (b"access-control-allow-credentials", b"true"),
        (b"access-control-expose-headers", ", ".join(settings.CORS_EXPOSE_HEADERS).encode()),
        (b"vary", b"origin"),
    ]


# What a fetch-based SSE client may send cross-origin: the REST API's list, plus
# Cache-Control, which some such clients set on stream requests.
def _preflight_headers(scope: dict[str, Any]) -> list[tuple[bytes, bytes]]:
    """The answer to a CORS preflight, as django-cors-headers answers REST ones: 200 with
    an empty body, and the CORS headers only for an allowed origin (the browser then
    refuses the request itself for any other)."""
    headers = [(b"content-length", b"0"), *_cors_headers(scope)]
    if _allowed_origin(scope) is not None:
        allow = [*settings.CORS_ALLOW_HEADERS, "cache-control"]
        headers += [
            (b"access-control-allow-methods", b"GET, HEAD, OPTIONS"),
            (b"access-control-allow-headers", ", ".join(allow).encode()),
            (b"access-control-max-age", str(settings.CORS_PREFLIGHT_MAX_AGE).encode()),
        ]
    return headers


# Why a WebSocket stream closed -> its close code. The reason (the key) is also the close
# frame's reason text, for clients that log or switch on it.
WS_CLOSE_CODES = {
    "auth_expired": 4401,
    "member_removed": 4403,
    "user_disabled": 4401,
    "key_revoked": 4401,
    "session_deleted": 4404,
    "slow_client": 4008,
    # 1012 ("service restart") is the standard code, but daphne's WebSocket library only
    # sends 1000 or 3000-4999.
    "shutdown": 4012,
    "gap": 4000,
    "payload_too_large": 4009,
    "internal_error": 1011,
}


# daphne drops close reasons unless taught otherwise (project/thirdparty.py).
daphne_sends_close_reasons()


async def _nothing() -> None:
    return None


class SSEConsumer(AsyncHttpConsumer):
    """``GET /api/sessions/{id}/stream/`` and ``GET /api/stream/``.

    Channels' AsyncHttpConsumer dispatches one message at a time, so a stream written from
    ``handle()`` never sees ``http.disconnect`` (channels #1747). Here ``__call__`` runs
    the writer and the wait for disconnect side by side and stops both when either ends.
    """

    channel_layer_alias = NO_LAYER

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        serving(asyncio.current_task())
        self.scope = scope
        self.base_send = send
        if scope["method"] == "OPTIONS" and any(k == b"access-control-request-method" for k, _ in scope["headers"]):
            await self.send_response(200, b"", headers=_preflight_headers(scope))
            return
        if scope["method"] not in ("GET", "HEAD"):
            err = BadRequest("Streams are read with GET.")
            err.code = "method_not_allowed"
            await self._error(err, status=405)
            return
        session_id = scope["url_route"]["kwargs"].get("session_id")
        try:
            request = await prepare(scope, session_id, "sse")
        except ApiError as err:
            await self._error(err)
            return
        except Exception:
            log.exception("Opening a stream failed")
            await self._error(InternalError())
            return
        conn = Connection(request, self._write)
        try:
            # The position first (PROTOCOL §5): every event committed once the client has
            # the headers must reach it, so the headers wait until it is fixed.
            await conn.fix_position()
        except BaseException as exc:
            await conn.close()  # gives back its slot in the per-user limit
            if not isinstance(exc, Exception):
                raise
            if isinstance(exc, ApiError):  # refused after all (fix_position's re-check)
                await self._error(exc)
                return
            log.exception("Opening a stream failed")
            await self._error(InternalError())
            return
        try:
            await self.send_headers(status=200, headers=SSE_HEADERS + _cors_headers(scope))
        except BaseException:
            await conn.close()
            raise
        stream = asyncio.ensure_future(self._stream(conn))
        conn.on_overflow = stream.cancel
        # Ends the body (the finally below) rather than being cancelled by the server.
        conn.when_server_stops(stream.cancel)
        gone = asyncio.ensure_future(self._wait_for_disconnect(receive))
        try:
            await asyncio.wait({stream, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (stream, gone):
                task.cancel()
            for task in (stream, gone):
                with contextlib.suppress(BaseException):
                    await task
            await conn.close()
            # Bounded: on a stalled socket (servers with backpressure) this would block.
            with contextlib.suppress(Exception, asyncio.TimeoutError):
                await asyncio.wait_for(self.send_body(b"", more_body=False), 1.0)

    async def _stream(self, conn: Connection) -> None:
        await conn.start()
        await conn.run()

    def _write(self, chunks: list[Any]) -> Awaitable[None]:
        # Straight to the server's send, no coroutine of its own: on the path of every
        # write to every connection, and Connection._flush drives what this returns by
        # hand. Several frames are one body chunk (one system call).
        if not chunks:
            return _nothing()
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        return self.base_send({"type": "http.response.body", "body": body, "more_body": True})  # type: ignore[no-any-return]

    @staticmethod
    async def _wait_for_disconnect(receive: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return

    async def _error(self, err: ApiError, status: int | None = None) -> None:
        headers = [(b"content-type", b"application/json"), *_cors_headers(self.scope)]
        headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
        if err.status == 401:
            headers.append((b"www-authenticate", b'Bearer realm="api"'))
        await self.send_response(status or err.status, orjson.dumps(err.body()), headers=headers)


class ServedSocket(AsyncWebsocketConsumer):
    """What every Tandem WebSocket shares: no channel layer of its own (the hub fans out),
    counted as served for graceful shutdown, closed ``shutdown`` when the server cancels it,
    and messages dispatched without Channels' per-message database hop."""

    channel_layer_alias = NO_LAYER

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        serving(asyncio.current_task())
        try:
            await super().__call__(scope, receive, send)
        except asyncio.CancelledError:
            # The server is shutting down (daphne cancels every application on SIGTERM):
            # tell the client to reconnect, elsewhere, with its last seq; then clean up.
            with contextlib.suppress(Exception):
                await send({"type": "websocket.close", "code": WS_CLOSE_CODES["shutdown"], "reason": "shutdown"})
            with contextlib.suppress(Exception):
                await self.disconnect(WS_CLOSE_CODES["shutdown"])
            raise

    async def dispatch(self, message: dict[str, Any]) -> None:
        # Skip AsyncConsumer.dispatch's per-message aclose_old_connections thread hop.
        handler = getattr(self, message["type"].replace(".", "_"), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)


class StreamSocketConsumer(ServedSocket):
    """``/ws/sessions/{id}/`` and ``/ws/stream/``: the same envelopes as SSE, plus
    commands. Refusals after the origin check accept and close with 44xx, because a
    browser cannot read the status of a failed handshake."""

    async def connect(self) -> None:
        self.conn: Connection | None = None
        self.task: asyncio.Task[None] | None = None
        session_id = self.scope["url_route"]["kwargs"].get("session_id")
        try:
            request = await prepare(self.scope, session_id, "ws")
        except ApiError as err:
            await self._refuse(err)
            return
        except Exception:
            log.exception("Opening a stream failed")
            await self._refuse(None)
            return
        self.conn = Connection(request, self._write)  # from here, disconnect() releases its slot
        try:
            # Before the accept (PROTOCOL §5): every event committed once the client sees
            # `open` must reach it.
            await self.conn.fix_position()
        except Exception as exc:
            # Its slot and hub places go now, not when the client gets round to leaving.
            conn, self.conn = self.conn, None
            await conn.close()
            if isinstance(exc, ApiError):  # refused after all (fix_position's re-check)
                await self._refuse(exc)
            else:
                log.exception("Opening a stream failed")
                await self._refuse(None)
            return
        await self.accept()
        self.task = asyncio.ensure_future(self._stream(self.conn))
        self.conn.on_overflow = self._too_slow
        self.conn.when_server_stops(self._server_stops)

    async def _refuse(self, err: ApiError | None) -> None:
        await self.accept()
        if err is None:
            await self.close(code=WS_CLOSE_CODES["internal_error"], reason="internal_error")
        else:
            await self.close(code=4000 + err.status if err.status < 1000 else 4500, reason=err.code)

    def _too_slow(self) -> None:
        self._end("slow_client")

    def _server_stops(self) -> None:
        self._end("shutdown")

    def _end(self, reason: str) -> None:
        code = WS_CLOSE_CODES[reason]
        if self.task is not None:
            self.task.cancel()
        asyncio.ensure_future(self._close_quietly(code, reason))

    async def _close_quietly(self, code: int, reason: str) -> None:
        # A client that is already gone (a server stopping closes every socket at once)
        # cannot be told; nothing is left to do, and nothing to log.
        with contextlib.suppress(*CLIENT_GONE):
            await self.close(code=code, reason=reason)

    async def _stream(self, conn: Connection) -> None:
        try:
            await conn.start()
            reason = await conn.run()
        except asyncio.CancelledError:
            raise
        except CLIENT_GONE:
            return  # the client went away mid-write: nothing to tell it
        except Exception:
            log.exception("WebSocket stream failed")
            reason = "internal_error"
        if reason not in WS_CLOSE_CODES:
            reason = "internal_error"
        await self.close(code=WS_CLOSE_CODES[reason], reason=reason)

    def _write(self, chunks: list[Any]) -> Awaitable[None]:
        # The ASGI message straight to the server's send, as AsyncWebsocketConsumer.send
        # would make it, without its two coroutines per frame. One envelope per message.
        if len(chunks) == 1:
            return self.base_send({"type": "websocket.send", "text": chunks[0]})  # type: ignore[no-any-return]
        return self._write_all(chunks)

    async def _write_all(self, chunks: list[Any]) -> None:
        send = self.base_send
        for text in chunks:
            await send({"type": "websocket.send", "text": text})

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if self.conn is None:
            return
        size = len(text_data.encode()) if text_data is not None else len(bytes_data or b"")
        if size > settings.TANDEM_MAX_WS_FRAME:
            # 1009 is "message too big", but daphne's WebSocket library only sends 1000
            # or 3000-4999, so it is 4009 here.
            await self.close(code=WS_CLOSE_CODES["payload_too_large"], reason="payload_too_large")
            return
        if text_data is None:
            reply: dict[str, Any] | None = {
                "type": "error", "id": None,
                "error": {"code": "bad_request", "message": "Send JSON text frames.", "details": {}},
            }
        else:
            reply = await commands.handle(self.conn, text_data)
        if reply is not None:
            await self.send(text_data=orjson.dumps(reply).decode())

    async def disconnect(self, code: int) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task
        if self.conn is not None:
            await self.conn.close()
