"""ASGI entry point: HTTP to the SSE consumers or Django, WebSocket through the origin
check and the stream auth middleware. Also binds this process's runtime loop and starts
its housekeeping (retention, presence refresh, recovery of interrupted replies and, in
inline mode, the agent pool) on first use."""
from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
import weakref
from typing import Any

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
django_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.urls import re_path  # noqa: E402

from events_app import presence, runtime  # noqa: E402
from events_app.routing import (  # noqa: E402
    StreamAuthMiddleware,
    StreamOriginValidator,
    sse_urlpatterns,
    websocket_urlpatterns,
)
from events_app.services import prune_forever  # noqa: E402
from events_app.streams import wait_for_streams  # noqa: E402
from project.logfilters import redact  # noqa: E402

_access_log = logging.getLogger("tandem.access")

_started: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()
_housekeeping: set[asyncio.Task[None]] = set()


def _start_housekeeping(loop: asyncio.AbstractEventLoop) -> None:
    runtime.bind(loop)
    if loop in _started:
        return
    _started.add(loop)
    from django.conf import settings

    from sessions_app.agents import pool

    jobs: list[Any] = [prune_forever, presence.refresh_forever, pool.reap_forever]
    if settings.TANDEM_AGENT_MODE == "inline":
        jobs.append(pool.start_inline)
    for job in jobs:
        task = loop.create_task(job())
        _housekeeping.add(task)
        task.add_done_callback(_housekeeping.discard)


class Tandem:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        _start_housekeeping(asyncio.get_running_loop())
        if not _access_log.isEnabledFor(logging.INFO):
            await self.app(scope, receive, send)
            return
        await self._logged(scope, receive, send)

    async def _logged(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """The access log, written here rather than by the ASGI server: servers log the
        raw URL, and stream URLs carry ``?token=`` and ``?ticket=``."""
        started = time.monotonic()
        status: list[int] = []

        async def sending(message: dict[str, Any]) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                status.append(message["status"])
            elif kind == "websocket.accept":
                status.append(101)
            elif kind == "websocket.http.response.start":  # a handshake denied with a response
                status.append(message["status"])
            elif kind == "websocket.close" and not status:
                status.append(403)
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            query = scope.get("query_string", b"").decode("latin-1")
            target = scope.get("path", "") + (f"?{redact(query)}" if query else "")
            method = scope.get("method", "WEBSOCKET")
            client = (scope.get("client") or ("-",))[0]
            _access_log.info(
                '%s "%s %s" %s %.3fs', client, method, target, status[0] if status else "-",
                time.monotonic() - started,
            )

    @staticmethod
    async def _lifespan(receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                _start_housekeeping(asyncio.get_running_loop())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                # uvicorn has cancelled the streams still open; let them end their
                # responses cleanly before it exits.
                await wait_for_streams(timeout=3.0)
                await send({"type": "lifespan.shutdown.complete"})
                return


class RequestGate:
    """At most ``TANDEM_MAX_CONCURRENT_REQUESTS`` Django requests at once per process;
    the rest wait here, as coroutines. Each Django request runs in a thread of its own,
    and every such thread competes with the event loop for the GIL: with 16 requests in
    flight the loop got a sliver of it, and events for open streams queued for seconds
    (docs/PERFORMANCE.md). Streams never pass through here."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._gates: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
            weakref.WeakKeyDictionary()
        )

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        loop = asyncio.get_running_loop()
        gate = self._gates.get(loop)
        if gate is None:
            from django.conf import settings

            gate = self._gates[loop] = asyncio.Semaphore(settings.TANDEM_MAX_CONCURRENT_REQUESTS)
        async with gate:
            await self.app(scope, receive, send)


application = Tandem(
    ProtocolTypeRouter(
        {
            "http": URLRouter(
                [*sse_urlpatterns, re_path(r"", RequestGate(django_app))]
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
