"""What ``/metrics`` shows (PROTOCOL §9), for this process. Each server process answers
for itself; Prometheus scrapes every one and sums. The view is ``project.views.metrics``:
the gauges read at scrape time come from the layers above this one."""
from __future__ import annotations

import time
from collections.abc import Callable

from django.http import HttpRequest, HttpResponse
from prometheus_client import Counter, Gauge, Histogram

OPEN_STREAMS = Gauge("tandem_open_streams", "Open SSE and WebSocket streams.", ["transport"])
EVENTS_PUBLISHED = Counter("tandem_events_published_total", "Events persisted by this process.")
EVENTS_DELIVERED = Counter(
    "tandem_events_delivered_total", "Event frames handed to streams (replay included)."
)
DELIVERY_LAG = Histogram(
    "tandem_delivery_lag_seconds",
    "From the commit of an event to this process passing it to its streams.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
RESUMES = Counter("tandem_stream_resumes_total", "Streams opened with a position to resume from.")
RESETS = Counter("tandem_stream_resets_total", "stream.reset sent instead of a replay.", ["reason"])
SLOW_DISCONNECTS = Counter(
    "tandem_slow_client_disconnects_total", "Streams closed because the client fell behind."
)
ACTIVE_REPLIES = Gauge("tandem_active_replies", "Agent replies running in this process.")
HTTP_LATENCY = Histogram(
    "tandem_http_request_duration_seconds", "Django request handling time (streams excluded).",
    ["method", "status"],
)


# Cluster-wide, the same on every server process: aggregate with max(), not sum().
REPLIES_QUEUED = Gauge(
    "tandem_replies_queued", "Replies waiting for a runner, across the deployment."
)
REPLIES_RUNNING = Gauge("tandem_replies_running", "Replies being run, across the deployment.")
AGENT_WORKERS = Gauge(
    "tandem_agent_workers", "Agents workers alive (heartbeats in Redis); worker mode only."
)


HUB_GROUPS = Gauge(
    "tandem_hub_groups",
    "Channel-layer groups this process subscribes to (one per followed session, and one for"
    " its agents pool when it runs replies).",
)
HUB_LISTENERS = Gauge("tandem_hub_listeners", "Streams (and the agents pool) attached to those groups.")
ASYNCIO_TASKS = Gauge("tandem_asyncio_tasks", "Tasks alive on the server's event loop.")


class RequestTimingMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        started = time.perf_counter()
        response = self.get_response(request)
        # Status classes, not codes or paths: bounded label sets.
        HTTP_LATENCY.labels(request.method or "", f"{response.status_code // 100}xx").observe(
            time.perf_counter() - started
        )
        return response
