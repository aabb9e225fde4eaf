"""CORS (PROTOCOL §8): only ``TANDEM_ALLOWED_ORIGINS`` may call the API from a page on
another origin, streams included."""
from __future__ import annotations

from typing import Any

import pytest
from django.test import Client

from tests.conftest import token_for
from tests.streamutil import bind_runtime, create_shared_session
from tests.test_sse_stream import sse

ALLOWED = "https://app.example.com"


@pytest.fixture
def allowed_origin(settings: Any) -> str:
    settings.CORS_ALLOWED_ORIGINS = [ALLOWED]
    return ALLOWED


@pytest.mark.django_db
def test_preflight_from_an_allowed_origin_is_answered(allowed_origin: str) -> None:
    response = Client().options(
        "/api/sessions/", HTTP_ORIGIN=allowed_origin,
        HTTP_ACCESS_CONTROL_REQUEST_METHOD="POST", HTTP_ACCESS_CONTROL_REQUEST_HEADERS="authorization, content-type",
    )
    assert response.status_code == 200
    assert response["Access-Control-Allow-Origin"] == allowed_origin
    assert "authorization" in response["Access-Control-Allow-Headers"]


@pytest.mark.django_db
@pytest.mark.parametrize("origin", ["https://evil.example", "null", "https://app.example.com.evil.example"])
def test_other_origins_get_no_cors_headers(allowed_origin: str, alice: Any, origin: str) -> None:
    response = Client().get(
        "/api/sessions/", HTTP_ORIGIN=origin, HTTP_AUTHORIZATION=f"Bearer {token_for(alice)}"
    )
    assert response.status_code == 200
    assert "Access-Control-Allow-Origin" not in response


@pytest.mark.django_db
def test_allowed_origin_reads_the_api(allowed_origin: str, alice: Any) -> None:
    response = Client().get(
        "/api/sessions/", HTTP_ORIGIN=allowed_origin, HTTP_AUTHORIZATION=f"Bearer {token_for(alice)}"
    )
    assert response["Access-Control-Allow-Origin"] == allowed_origin
    assert "Retry-After" in response["Access-Control-Expose-Headers"].title()


@pytest.mark.django_db(transaction=True)
async def test_sse_streams_and_their_errors_follow_the_same_list(
    allowed_origin: str, alice: Any, bob: Any, carol: Any, charlie: Any
) -> None:
    bind_runtime()
    session = await create_shared_session(alice)
    ok = sse(session.id, bob)
    ok.comm.scope["headers"].append((b"origin", allowed_origin.encode()))
    await ok.connected()
    assert ok.headers["access-control-allow-origin"] == allowed_origin
    await ok.close()
    refused = sse(session.id, charlie)
    refused.comm.scope["headers"].append((b"origin", allowed_origin.encode()))
    assert await refused.open() == 404
    assert refused.headers["access-control-allow-origin"] == allowed_origin  # the page can read why
    other = sse(session.id, bob)
    other.comm.scope["headers"].append((b"origin", b"https://evil.example"))
    await other.connected()
    assert "access-control-allow-origin" not in other.headers
    await other.close()
