"""Operational endpoints and the landing page; the API lives in the apps."""
from __future__ import annotations

from project import redisconn
from django.conf import settings
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse

from project.errors import NotFound, Unavailable, error_response


def api_not_found(request: HttpRequest, *args: object, **kwargs: object) -> HttpResponse:
    return error_response(NotFound("No such endpoint."))


def healthz(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"status": "ok"})


def readyz(request: HttpRequest) -> HttpResponse:
    failing = []
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except Exception:
        failing.append("database")
    if settings.REDIS_URL:
        try:
            redisconn.client(settings.REDIS_URL, socket_timeout=2, socket_connect_timeout=2).ping()
        except Exception:
            failing.append("channel_layer")
    if failing:
        err = Unavailable(f"Not ready: {', '.join(failing)} unreachable.", details={"failing": failing})
        return error_response(err)
    # Reported, never failing: without workers replies wait in the queue, but taking
    # every web process out of the load balancer would not bring a worker back.
    from sessions_app.agents.pool import agents_report

    return JsonResponse({"status": "ok", "database": "ok", "channel_layer": "ok", "agents": agents_report()})
