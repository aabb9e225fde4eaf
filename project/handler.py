"""Django's ASGI handler, with each request served in one hop to a thread and back.

Django's own ``ASGIHandler`` runs a request in async mode: ``request_started`` in a
thread of the request's ``ThreadSensitiveContext`` (a new thread for every request, made
and joined each time), the synchronous middleware in it, back to the event loop for the
async handler inside them, to the thread again for the view, back, and to the thread once
more for ``response.close()``. Every crossing is a GIL hand-off that the server's event
loop, which writes every open stream, waits on; under a load of message posts the
crossings and the thread per request cost about as much of the server's CPU as the view
itself (docs/PERFORMANCE.md, "Issue 12: message posts").

Every view of this project is synchronous, so this handler does what Django's WSGI
handler does, in one call on a pool of ``TANDEM_MAX_CONCURRENT_REQUESTS`` threads (the
request gate in ``project.asgi`` lets no more in at once): ``request_started``, the
synchronous middleware chain and view, the response's body and ``response.close()``
(``request_finished``). Django's signals close the request's database connection as
they do around any request, in the thread that used it. Only the sending happens on the
loop. A streaming response (a static file) is read a chunk per hop, so it is never held
whole in memory. The middleware, their order, the error responses and the request object
are Django's own."""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from django.conf import settings
from django.core import signals
from django.core.exceptions import RequestAborted
from django.core.handlers import base
from django.core.handlers.asgi import ASGIHandler, get_script_prefix
from django.db import close_old_connections
from django.http import FileResponse, HttpResponseBase
from django.urls import set_script_prefix

Headers = list[tuple[bytes, bytes]]
T = TypeVar("T")


class OneHopHandler(ASGIHandler):
    def __init__(self) -> None:
        base.BaseHandler.__init__(self)
        self.load_middleware(is_async=False)
        self._threads = concurrent.futures.ThreadPoolExecutor(
            settings.TANDEM_MAX_CONCURRENT_REQUESTS, thread_name_prefix="tandem-request"
        )

    async def _in_thread(self, context: contextvars.Context, func: Callable[..., T], *args: Any) -> T:
        """``func(*args)`` on a request thread, in the request's ``context``: one copy of
        the caller's per request, so what one hop sets (the script prefix, the database
        connection) the next hop of a streaming response sees. The loop's
        ``run_in_executor`` directly, as ``project.db.off_loop`` does: asgiref's
        ``sync_to_async`` copies every context variable back to the caller after each
        call, which the loop side never reads."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._threads, functools.partial(context.run, func, *args))

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            raise ValueError(f"Django can only handle ASGI/HTTP connections, not {scope['type']}.")
        try:
            body_file = await self.read_body(receive)
        except RequestAborted:
            return
        context = contextvars.copy_context()  # the hops run one after another, never at once
        try:
            status, headers, body, rest = await self._in_thread(context, self._respond, scope, body_file)
        finally:
            body_file.close()
        await send({"type": "http.response.start", "status": status, "headers": headers})
        if rest is None:
            await send({"type": "http.response.body", "body": body})
            return
        # A streaming response: one chunk per hop, then its close (request_finished).
        chunk: bytes | None = body
        try:
            while chunk is not None:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                chunk = await self._in_thread(context, _next_or_close, rest)
            await send({"type": "http.response.body", "body": b""})
        finally:
            if chunk is not None:  # the client left, or sending failed: close it all the same
                await self._in_thread(context, rest.close)

    def _respond(self, scope: dict[str, Any], body_file: Any) -> tuple[int, Headers, bytes, _Stream | None]:
        """The whole request in this thread: Django's signals, middleware and view, and,
        unless it streams, the response's body and its close."""
        set_script_prefix(get_script_prefix(scope))
        signals.request_started.send(sender=self.__class__, scope=scope)
        response: HttpResponseBase | None = None
        try:
            request, response = self.create_request(scope, body_file)
            if request is not None:
                response = self.get_response(request)
                response._handler_class = self.__class__  # type: ignore[attr-defined]
            assert response is not None
            if isinstance(response, FileResponse):
                response.block_size = self.chunk_size
            headers = _headers(response)
            if response.streaming:
                # Its close (request_finished) will run in whichever pool thread reads its
                # last chunk: give back this thread's connections now, as it would.
                close_old_connections()
                stream = _Stream(response, iter(response))
                first = _next_or_close(stream)
                if first is not None:
                    return response.status_code, headers, first, stream
                return response.status_code, headers, b"", None
            body = response.content  # type: ignore[attr-defined]
            return response.status_code, headers, body, None
        finally:
            if response is None or not response.streaming:
                # request_finished (close_old_connections), in the thread that used them;
                # a response that could not be made still ends the request.
                if response is not None:
                    response.close()
                else:
                    signals.request_finished.send(sender=self.__class__)


class _Stream:
    def __init__(self, response: HttpResponseBase, chunks: Iterator[bytes]) -> None:
        self.response, self.chunks, self.closed = response, chunks, False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.response.close()


def _next_or_close(stream: _Stream) -> bytes | None:
    """The next chunk, or None once there is none (and the response is closed)."""
    try:
        return next(stream.chunks)
    except StopIteration:
        stream.close()
        return None
    except BaseException:
        stream.close()
        raise


def _headers(response: HttpResponseBase) -> Headers:
    """As ``ASGIHandler.send_response`` makes them: the header case kept, cookies added."""
    out: Headers = []
    for header, value in response.items():
        out.append((header.encode("ascii") if isinstance(header, str) else bytes(header),
                    value.encode("latin1") if isinstance(value, str) else bytes(value)))
    for cookie in response.cookies.values():
        out.append((b"Set-Cookie", cookie.output(header="").encode("ascii").strip()))
    return out
