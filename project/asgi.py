"""ASGI entry point: HTTP to the SSE consumers or Django, WebSocket through the origin
check and the stream auth middleware. Also builds this process's runtime on the server's
loop (``project.runtime``) and starts its housekeeping (retention, presence refresh,
recovery of interrupted replies and, in inline mode, the agent pool) at start-up: on
lifespan startup, or on the first request of a server without lifespan."""
from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import threading
import time
from collections.abc import Awaitable
from typing import Any

import django
import orjson

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
django.setup(set_prefix=False)

from project.handler import OneHopHandler  # noqa: E402

django_app = OneHopHandler()

from project.logfilters import adopt_server_loggers  # noqa: E402

adopt_server_loggers()  # the server's own lines: redacted, and JSON like ours

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.urls import re_path  # noqa: E402

from events_app import presence  # noqa: E402
from events_app.routing import (  # noqa: E402
    StreamAuthMiddleware,
    StreamOriginValidator,
    sse_urlpatterns,
    websocket_urlpatterns,
)
from events_app.services import prune_forever  # noqa: E402
from events_app.streams import end_all_streams, wait_for_streams  # noqa: E402
from project import runtime  # noqa: E402
from project.db import drain as drain_database_calls  # noqa: E402
from project.errors import ApiError, BadRequest, PayloadTooLarge, RequestTimeout  # noqa: E402
from project.logfilters import redact  # noqa: E402
from sessions_app import mcp_server  # noqa: E402

_access_log = logging.getLogger("tandem.access")


def _start(loop: asyncio.AbstractEventLoop) -> None:
    """The server's loop is this process's main loop; its runtime starts housekeeping
    once. Cheap after the first call: it runs for every request."""
    _HOUSEKEEPING.get(runtime.bind(loop))


def _start_housekeeping(rt: runtime.Runtime) -> list[asyncio.Task[None]]:
    _end_streams_on_exit_signals()
    from django.conf import settings

    from project import liveness
    from sessions_app import doc
    from sessions_app.agents import pool

    jobs: list[Any] = [
        prune_forever, presence.refresh_forever, pool.reap_forever, liveness.beat_forever, doc.compact_forever,
    ]
    if settings.TANDEM_AGENT_MODE == "inline":
        jobs.append(pool.start_inline)
    return [rt.spawn(job()) for job in jobs]


_HOUSEKEEPING = runtime.Component("housekeeping", _start_housekeeping)


class Tandem:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        _start(asyncio.get_running_loop())
        if not _access_log.isEnabledFor(logging.INFO):
            await self.app(scope, receive, send)
            return
        await self._logged(scope, receive, send)

    async def _logged(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """The access log, written here rather than by the ASGI server: servers log the
        raw URL, and stream URLs carry ``?token=`` and ``?ticket=``."""
        started = time.monotonic()
        status: list[int] = []

        # A plain function handing back the server's own coroutine, not a coroutine of
        # its own: a stream sends through here once per write, for hours, and
        # Connection._flush drives that coroutine by hand (docs/PERFORMANCE.md).
        def sending(message: dict[str, Any]) -> Awaitable[None]:
            if not status:
                kind = message["type"]
                if kind == "http.response.start":
                    status.append(message["status"])
                elif kind == "websocket.accept":
                    status.append(101)
                elif kind == "websocket.http.response.start":  # a handshake denied with a response
                    status.append(message["status"])
                elif kind == "websocket.close":
                    status.append(403)
            return send(message)  # type: ignore[no-any-return]

        try:
            await self.app(scope, receive, sending)
        finally:
            query = scope.get("query_string", b"").decode("latin-1")
            target = scope.get("path", "") + (f"?{redact(query)}" if query else "")
            method = scope.get("method", "WEBSOCKET")
            client = (scope.get("client") or ("-",))[0]
            code = status[0] if status else None
            elapsed = time.monotonic() - started
            _access_log.info(
                '%s "%s %s" %s %.3fs', client, method, target, code or "-", elapsed,
                extra={  # separate fields in the JSON log
                    "client": client, "method": method, "path": target, "status": code,
                    "duration_ms": round(elapsed * 1000, 1),
                },
            )

    @staticmethod
    async def _lifespan(receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                _start(asyncio.get_running_loop())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                # Normally every stream ended when the signal came
                # (_end_streams_on_exit_signals); this covers a server stopped without one.
                end_all_streams()
                await wait_for_streams(timeout=3.0)
                # A stream's call cancelled above goes on in its thread: let it end
                # (and close its connection) before the server exits.
                await drain_database_calls(timeout=3.0)
                await send({"type": "lifespan.shutdown.complete"})
                return


_signals_chained = False  # signal handlers belong to the process, not to a runtime


def _end_streams_on_exit_signals() -> None:
    """Chain a handler in front of the server's own for SIGTERM and SIGINT: it ends every
    open stream at once (``end_all_streams``) while the server still runs normally, waits
    for them (up to 1 s), and only then calls the server's handler.

    uvicorn sends ``lifespan.shutdown`` only after every connection has closed, and an
    SSE response or a WebSocket never closes by itself: it waited out
    ``--timeout-graceful-shutdown``, then cancelled the streams (an ERROR line and
    tracebacks). daphne cancels its applications at once, but the reactor stops before a
    WebSocket's close frame leaves. Ended here, SSE bodies finish and WebSockets close
    with 4012 first, and either server then exits at once. A second signal goes straight
    to the server (uvicorn: force quit).

    Only where a server has installed a handler of its own (uvicorn, gunicorn's uvicorn
    worker, daphne's Twisted reactor), never over Python's defaults: a process that merely
    imports the app (tests, scripts) keeps its signals as they are."""
    global _signals_chained
    if _signals_chained or threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread
    _signals_chained = True
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)
        if not callable(previous) or previous is signal.default_int_handler:
            continue

        def handler(signum: int, frame: Any, previous: Any = previous) -> None:
            loop = runtime.bound_loop()
            rt = None if loop is None else runtime.of(loop)
            if rt is None or rt.stopping:
                previous(signum, frame)  # a second signal forces the exit, as before
                return
            rt.stopping = True
            # Only schedule: a signal handler runs between any two bytecodes of the loop.
            rt.loop.call_soon_threadsafe(_end_streams_then, rt, previous, signum, frame)

        signal.signal(sig, handler)


def _end_streams_then(rt: runtime.Runtime, previous: Any, signum: int, frame: Any) -> None:
    async def run() -> None:
        end_all_streams()
        # The server's own handler only once the streams have ended (briefly bounded):
        # daphne's reactor would otherwise stop before a WebSocket's close frame leaves.
        await wait_for_streams(timeout=1.0)
        previous(signum, frame)

    rt.spawn(run())


def _header(scope: dict[str, Any], name: bytes) -> bytes | None:
    headers: list[tuple[bytes, bytes]] = scope.get("headers", [])
    for key, value in headers:
        if key == name:
            return value
    return None


async def _refuse(send: Any, err: ApiError) -> None:
    # Connection: close, because the rest of the body (if any) is never read.
    await send({
        "type": "http.response.start",
        "status": err.status,
        "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
    })
    await send({"type": "http.response.body", "body": orjson.dumps(err.body())})


async def read_body(scope: dict[str, Any], receive: Any, send: Any) -> tuple[dict[str, Any], Any] | None:
    """Read the whole request body into memory, bounded by ``DATA_UPLOAD_MAX_MEMORY_SIZE``
    and by ``TANDEM_REQUEST_BODY_TIMEOUT`` seconds, and return the scope and a ``receive``
    that replays it to Django; None when the request was answered here (400, 408, 413) or
    the client left. A ``Content-Length`` over the limit is refused before a byte of the
    body is read. A chunked body (no ``Content-Length``) is read the same way and handed
    to Django with the ``Content-Length`` it turned out to have: Django reads no body
    without one."""
    from django.conf import settings

    limit: int = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    declared = _header(scope, b"content-length")
    if declared is not None:
        try:
            length = int(declared)
            if length < 0:
                raise ValueError
        except ValueError:
            await _refuse(send, BadRequest("Content-Length is not a number."))
            return None
        if length > limit:
            await _refuse(send, PayloadTooLarge(details={"limit_bytes": limit}))
            return None
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(settings.TANDEM_REQUEST_BODY_TIMEOUT):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return None
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    await _refuse(send, PayloadTooLarge(details={"limit_bytes": limit}))
                    return None
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
    except TimeoutError:
        await _refuse(send, RequestTimeout())
        return None
    body = b"".join(chunks)
    if declared is None and (body or _header(scope, b"transfer-encoding") is not None):
        headers = [
            (k, v) for k, v in scope.get("headers", []) if k not in (b"content-length", b"transfer-encoding")
        ]
        scope = {**scope, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
    replayed = False

    async def replay() -> dict[str, Any]:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        message: dict[str, Any] = await receive()  # Django listens for http.disconnect while it works
        return message

    return scope, replay


class RequestGate:
    """At most ``TANDEM_MAX_CONCURRENT_REQUESTS`` Django requests at once per process;
    the rest wait here, as coroutines. Each Django request runs in a thread (of the
    handler's pool, project/handler.py), and every such thread competes with the event
    loop for the GIL: with 16 requests in
    flight the loop got a sliver of it, and events for open streams queued for seconds
    (docs/PERFORMANCE.md). Streams never pass through here. The body is read before a
    place is taken (``read_body``): a client that sends its body slowly, or never
    finishes it, must not hold one of the few places while the rest wait."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        read = await read_body(scope, receive, send)
        if read is None:
            return
        scope, receive = read
        async with _GATE.get():
            await self.app(scope, receive, send)


def _make_gate(rt: runtime.Runtime) -> asyncio.Semaphore:
    from django.conf import settings

    return asyncio.Semaphore(settings.TANDEM_MAX_CONCURRENT_REQUESTS)


_GATE = runtime.Component("request gate", _make_gate)


application = Tandem(
    ProtocolTypeRouter(
        {
            "http": URLRouter(
                # URLRouter routes to ASGI applications; Django's stubs type re_path for views.
                # /mcp/ is not behind the request gate: a request_approval holds its request
                # open for minutes, waiting for a person, and uses no Django request thread.
                [
                    *sse_urlpatterns,
                    re_path(r"^mcp/\Z", mcp_server.HttpEndpoint()),  # type: ignore[arg-type]
                    re_path(r"", RequestGate(django_app)),  # type: ignore[arg-type]
                ]
            ),
            "websocket": StreamOriginValidator(
                StreamAuthMiddleware(URLRouter(websocket_urlpatterns))
            ),
        }
    )
)


def _tune_gc() -> None:
    """Everything imported so far lives as long as the process: move it out of the
    collector's sight (``gc.freeze``), and collect the young generation less often. With
    Python's defaults, full collections walking Django's and every stream's objects were
    the slowest deliveries under fan-out (p99 294 -> 58 ms at 1,000 clients; see
    docs/PERFORMANCE.md)."""
    from django.conf import settings

    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(settings.TANDEM_GC_THRESHOLD, gen1, gen2)


_tune_gc()
