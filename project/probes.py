"""``/healthz``, ``/readyz`` and ``/metrics`` answer whatever the ``Host`` header says, and
nothing else does: load balancers and Prometheus probe a process by its IP address, which
``ALLOWED_HOSTS`` rightly does not list.

The middleware runs before every other one that could look at the host (Django's
``request.get_host()`` raises ``DisallowedHost``: CommonMiddleware, the HTTPS redirect,
CSRF). The probes are answered here, without sessions, CSRF or redirects. Every other
request has its host checked here, once: a host that is not allowed gets a 400 (the error
shape under ``/api/``) and one WARNING line, instead of Django's ERROR with a traceback.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

from django.core.exceptions import DisallowedHost
from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest

from project import views
from project.errors import BadRequest, error_response

log = logging.getLogger("tandem.hosts")

PROBES: dict[str, Callable[[HttpRequest], HttpResponse]] = {
    "/healthz": views.healthz,
    "/readyz": views.readyz,
    "/metrics": views.metrics,
}


class ProbesAndHostCheck:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        probe = PROBES.get(request.path_info)
        if probe is not None:
            return probe(request)
        try:
            request.get_host()
        except DisallowedHost as exc:
            log.warning("%s", exc)
            if request.path.startswith("/api/"):
                return error_response(BadRequest("This server does not serve that host."))
            return HttpResponseBadRequest(b"<h1>Bad Request (400)</h1>")
        return self.get_response(request)
