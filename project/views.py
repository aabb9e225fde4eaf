"""Operational endpoints and the landing page; the API lives in the apps. The probes are
routed by project.probes, for any Host."""
from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable

from asgiref.sync import async_to_sync
from django.conf import settings
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from events_app import fanout
from events_app.metrics import ASYNCIO_TASKS, HUB_GROUPS, HUB_LISTENERS
from project import redisconn, runtime
from project.db import off_loop
from project.errors import Unavailable, error_response

log = logging.getLogger("tandem.readiness")

# The agents layer sits above this module: it registers what /readyz and /metrics report
# on it (sessions_app.apps), so the probes never import it.
_ready_reports: dict[str, Callable[[], object]] = {}
_scrape_hooks: list[Callable[[], None]] = []


def add_ready_report(name: str, report: Callable[[], object]) -> None:
    """``report()`` becomes ``name`` in a ready answer. It is reported, never failing."""
    _ready_reports[name] = report


def add_scrape_hook(hook: Callable[[], None]) -> None:
    """``hook()`` runs at every scrape of /metrics, before the metrics are rendered."""
    if hook not in _scrape_hooks:
        _scrape_hooks.append(hook)


# Each dependency must answer within this; probes time out at 1 s by default (Kubernetes).
CHECK_TIMEOUT = 0.5


def healthz(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"status": "ok"})


async def _check_database() -> None:
    if connection.vendor != "postgresql":
        await off_loop(_select_one)()  # SQLite: a local file
        return
    import psycopg

    # A connection of its own rather than one from the pool: with the database down the
    # pool waits its full timeout (10 s) for a connection; this one is cancelled when the
    # check times out.
    params = connection.get_connection_params()
    for name in ("cursor_factory", "context", "prepare_threshold"):
        params.pop(name, None)
    params.setdefault("connect_timeout", 2)  # libpq's own floor; the check's bound is ours
    conn = await psycopg.AsyncConnection.connect(**params)
    try:
        await conn.execute("SELECT 1")
    finally:
        await conn.close()


def _select_one() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


async def _check_redis() -> None:
    client = redisconn.async_client(
        settings.REDIS_URL, socket_connect_timeout=CHECK_TIMEOUT, socket_timeout=CHECK_TIMEOUT
    )
    try:
        await client.ping()
    finally:
        await client.aclose()


async def _run_checks(checks: dict[str, Callable[[], Awaitable[None]]]) -> dict[str, str]:
    """Every check at once, each bounded by CHECK_TIMEOUT: name -> "ok" or why not."""

    async def one(check: Callable[[], Awaitable[None]]) -> str:
        try:
            async with asyncio.timeout(CHECK_TIMEOUT):
                await check()
        except TimeoutError:
            return f"no answer within {CHECK_TIMEOUT} s"
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:200]
        return "ok"

    results = await asyncio.gather(*(one(check) for check in checks.values()))
    return dict(zip(checks, results, strict=True))


_state_lock = threading.Lock()
_last_failing: tuple[str, ...] = ()


def _note_state(failing: tuple[str, ...], results: dict[str, str]) -> None:
    """One WARNING when this process stops being ready (or what fails changes), one INFO
    when it is ready again; not a line per probe."""
    global _last_failing
    with _state_lock:
        changed, _last_failing = failing != _last_failing, failing
    if not changed:
        return
    if failing:
        log.warning("Not ready: %s", "; ".join(f"{name}: {results[name]}" for name in failing))
    else:
        log.info("Ready again")


def readyz(request: HttpRequest) -> HttpResponse:
    checks: dict[str, Callable[[], Awaitable[None]]] = {"database": _check_database}
    if settings.REDIS_URL:
        checks["channel_layer"] = _check_redis
    results = async_to_sync(_run_checks)(checks)
    failing = tuple(name for name, result in results.items() if result != "ok")
    _note_state(failing, results)
    if failing:
        err = Unavailable(f"Not ready: {', '.join(failing)} unreachable.", details={"failing": list(failing)})
        # _note_state logged it; Django's own line is dropped (logfilters.QuietReadinessFailures).
        return error_response(err)
    # Reported, never failing: without workers replies wait in the queue, but taking
    # every web process out of the load balancer would not bring a worker back.
    reports = {name: report() for name, report in _ready_reports.items()}
    return JsonResponse({"status": "ok", "database": "ok", "channel_layer": "ok", **reports})


def metrics(request: HttpRequest) -> HttpResponse:
    for hook in _scrape_hooks:
        hook()
    # Read at scrape time: with open streams and hub gauges, a leak shows as a level
    # that does not come back down after clients leave.
    groups, listeners = fanout.local_subscriptions()
    HUB_GROUPS.set(groups)
    HUB_LISTENERS.set(listeners)
    loop = runtime.bound_loop()
    if loop is not None:
        ASYNCIO_TASKS.set(len(asyncio.all_tasks(loop)))
    return HttpResponse(generate_latest(), content_type=CONTENT_TYPE_LATEST)
