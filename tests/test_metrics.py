"""``/metrics`` (PROTOCOL §9): Prometheus text that moves with what the process does."""
from __future__ import annotations

import re
from typing import Any

import pytest
from django.test import Client

from tests.streamutil import bind_runtime, create_shared_session, publish_many
from tests.test_sse_stream import sse

pytestmark = pytest.mark.django_db(transaction=True)


def sample(name: str, **labels: str) -> float:
    text = Client().get("/metrics").content.decode()
    label_text = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = rf"^{re.escape(name)}{re.escape('{' + label_text + '}') if labels else ''} (\S+)$"
    match = re.search(pattern, text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_metrics_is_prometheus_text_with_every_family() -> None:
    response = Client().get("/metrics")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    body = response.content.decode()
    for family in (
        "tandem_open_streams", "tandem_events_published_total", "tandem_events_delivered_total",
        "tandem_delivery_lag_seconds", "tandem_stream_resumes_total", "tandem_stream_resets_total",
        "tandem_slow_client_disconnects_total", "tandem_active_replies",
        "tandem_http_request_duration_seconds",
    ):
        assert f"# TYPE {family}" in body, family


async def test_streams_events_resumes_and_resets_are_counted(alice: Any, bob: Any, carol: Any, charlie: Any) -> None:
    from channels.db import database_sync_to_async

    bind_runtime()
    session = await create_shared_session(alice)
    read = database_sync_to_async(sample)
    open_before = await read("tandem_open_streams", transport="sse")
    published_before = await read("tandem_events_published_total")
    delivered_before = await read("tandem_events_delivered_total")
    lag_before = await read("tandem_delivery_lag_seconds_count")
    client = sse(session.id, bob)
    await client.connected()
    assert await read("tandem_open_streams", transport="sse") == open_before + 1
    seqs = await publish_many(session.id, 3)
    await client.until_seq(seqs[-1])
    assert await read("tandem_events_published_total") == published_before + 3
    assert await read("tandem_events_delivered_total") >= delivered_before + 3
    assert await read("tandem_delivery_lag_seconds_count") >= lag_before + 3
    await client.close()
    assert await read("tandem_open_streams", transport="sse") == open_before

    resumes = await read("tandem_stream_resumes_total")
    resumed = sse(session.id, bob, last_event_id_header=str(seqs[0]))
    await resumed.connected()
    await resumed.close()
    assert await read("tandem_stream_resumes_total") == resumes + 1
    resets = await read("tandem_stream_resets_total", reason="unknown_position")
    beyond = sse(session.id, bob, last_event_id_header="999999")
    await beyond.connected()
    await beyond.close()
    assert await read("tandem_stream_resets_total", reason="unknown_position") == resets + 1


def test_http_latency_is_recorded_per_method_and_status_class() -> None:
    before = sample("tandem_http_request_duration_seconds_count", method="GET", status="2xx")
    Client().get("/healthz")
    assert sample("tandem_http_request_duration_seconds_count", method="GET", status="2xx") >= before + 1
