"""The innermost middleware: a synchronous boundary. Under ASGI, Django runs an
async-capable middleware in async mode when the handler inside it is async (the view
handler always is), and each of its ``process_request``/``process_response`` calls is
then a ``sync_to_async`` hop to the request's thread and back: Django's six below our
sync-only middleware made a request cross between the event loop and its thread about
twenty times, each crossing a GIL hand-off that the server's event loop (every open
stream) waits on (docs/PERFORMANCE.md, "Issue 12: message posts"). This one is
sync-only and last in ``MIDDLEWARE``, so every middleware outside it sees a synchronous
handler and runs in the request's thread; the loop is entered once, to reach the view.
It does nothing else."""
from __future__ import annotations

from collections.abc import Callable

from django.http import HttpRequest, HttpResponse, HttpResponseBase
from django.shortcuts import render


class SyncBoundary:
    sync_capable = True
    async_capable = False

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        return self.get_response(request)


class NotFoundPage:
    """Every 404 of a page (not ``/api/``) is the Tandem 404 page, whatever made it and
    whether DEBUG is on: Django's technical 404 lists the URL patterns, which no visitor
    should see. API 404s keep the JSON error shape (``project.errors``). It sits inside
    ``CommonMiddleware`` so that ``APPEND_SLASH`` still redirects ``/s/x`` to ``/s/x/``,
    and after ``AuthenticationMiddleware`` so the page's top bar knows who is signed in."""

    sync_capable = True
    async_capable = False

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        response = self.get_response(request)
        if response.status_code != 404 or request.path.startswith("/api/"):
            return response
        if getattr(response, "tandem_page", False):
            return response
        return not_found_page(request)


def not_found_page(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    response = render(request, "404.html", status=404)
    response.tandem_page = True  # type: ignore[attr-defined]
    return response
