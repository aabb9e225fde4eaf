"""Hostile credentials and requests on every surface (REST, SSE, WebSocket): forged,
unsigned, foreign-key, expired and future-dated JWTs, forged and expired tickets,
oversized headers and query strings, hostile origins. Each is a clean refusal."""
from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable
from typing import Any

import jwt
import pytest
from django.conf import settings
from django.core import signing
from rest_framework_simplejwt.tokens import AccessToken, RefreshToken

from project.auth import issue_ticket
from tests.conftest import client_for
from tests.helpers import assert_error
from tests.streamutil import bind_runtime, create_shared_session
from tests.test_sse_stream import sse
from tests.test_ws_stream import ws


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


def _claims(user: Any, **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"token_type": "access", "user_id": str(user.pk), "jti": "j1", "iat": now, "exp": now + 600, **extra}


HOSTILE_TOKENS: dict[str, Callable[[Any], str]] = {
    "alg-none": lambda u: f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(_claims(u))}.",
    "alg-none-with-signature": lambda u: f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(_claims(u))}.AAAA",
    "another-key": lambda u: jwt.encode(_claims(u), "some-other-key-long-enough-for-hs256!", algorithm="HS256"),
    "hs512-with-our-key": lambda u: jwt.encode(_claims(u), settings.SECRET_KEY, algorithm="HS512"),
    "expired": lambda u: jwt.encode(_claims(u, exp=int(time.time()) - 5), settings.SECRET_KEY, algorithm="HS256"),
    "not-yet-valid": lambda u: jwt.encode(_claims(u, nbf=int(time.time()) + 3600), settings.SECRET_KEY, algorithm="HS256"),
    "issued-in-the-future": lambda u: jwt.encode(_claims(u, iat=int(time.time()) + 3600), settings.SECRET_KEY, algorithm="HS256"),
    "refresh-not-access": lambda u: str(RefreshToken.for_user(u)),
    "no-user": lambda u: jwt.encode({**_claims(u), "user_id": "999999"}, settings.SECRET_KEY, algorithm="HS256"),
    "truncated": lambda u: str(AccessToken.for_user(u))[:-10],
    "garbage": lambda u: "x" * 5000,
    "not-base64": lambda u: "%%%.%%%.%%%",
}


@pytest.mark.django_db
@pytest.mark.parametrize("kind", sorted(HOSTILE_TOKENS))
def test_hostile_jwts_are_refused_on_rest(alice: Any, kind: str) -> None:
    token = HOSTILE_TOKENS[kind](alice)
    client = client_for(None)
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    assert_error(client.get("/api/sessions/"), 401, "authentication_failed")


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("kind", sorted(HOSTILE_TOKENS))
async def test_hostile_jwts_are_refused_on_streams(alice: Any, bob: Any, carol: Any, charlie: Any, kind: str) -> None:
    bind_runtime()
    session = await create_shared_session(alice)
    token = HOSTILE_TOKENS[kind](bob)
    client = sse(session.id, token=token)
    assert await client.open() == 401
    assert (await client.json())["error"]["code"] == "authentication_failed"
    socket = ws(session.id, token=token)
    await socket.connect()
    assert await socket.closed() == 4401


def _forged_tickets(user: Any) -> dict[str, str]:
    real = issue_ticket(user)
    value, _, signature = real.rpartition(":")
    return {
        "bad-signature": f"{value}:{'A' * len(signature)}",
        "another-key": signing.TimestampSigner(key="another-secret-key-entirely", salt="tandem.ticket").sign(str(user.pk)),
        "other-user": real.replace(str(user.pk), str(user.pk + 1000), 1),
        "garbage": "not-a-ticket",
        "empty": "",
    }


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("kind", ["bad-signature", "another-key", "other-user", "garbage", "empty"])
async def test_forged_tickets_are_refused(alice: Any, bob: Any, carol: Any, charlie: Any, kind: str) -> None:
    bind_runtime()
    session = await create_shared_session(alice)
    from channels.db import database_sync_to_async

    ticket = (await database_sync_to_async(_forged_tickets)(bob))[kind]
    client = sse(session.id, ticket=ticket)
    status = await client.open()
    assert status == 401, status
    assert (await client.json())["error"]["code"] in ("authentication_failed", "not_authenticated")


@pytest.mark.django_db(transaction=True)
async def test_expired_ticket_is_refused(alice: Any, bob: Any, carol: Any, charlie: Any, settings: Any) -> None:
    bind_runtime()
    session = await create_shared_session(alice)
    from channels.db import database_sync_to_async

    ticket = await database_sync_to_async(issue_ticket)(bob)
    settings.TANDEM_TICKET_SECONDS = 0  # every ticket is now past its lifetime
    await asyncio.sleep(1.1)
    client = sse(session.id, ticket=ticket)
    assert await client.open() == 401
    assert (await client.json())["error"]["code"] == "authentication_failed"


@pytest.mark.django_db
def test_oversized_query_strings_and_headers_are_refused_cleanly(alice: Any, shared_session: Any) -> None:
    client = client_for(alice)
    huge = "x" * 200_000
    response = client.get(f"/api/sessions/{shared_session.id}/events/?types={huge}")
    assert_error(response, 400, "bad_request")
    response = client.get("/api/sessions/", HTTP_X_JUNK=huge)
    assert response.status_code == 200  # ignored, not a crash
    client.credentials(HTTP_AUTHORIZATION="Bearer " + huge)
    assert_error(client.get("/api/sessions/"), 401, "authentication_failed")


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    "origin", ["https://evil.example", "null", "http://127.0.0.1.evil.example", "file://", "x" * 5000]
)
async def test_hostile_origins_cannot_open_a_websocket_with_the_cookie(
    alice: Any, bob: Any, carol: Any, charlie: Any, origin: str
) -> None:
    from django.test import Client

    bind_runtime()
    session = await create_shared_session(alice)
    from channels.db import database_sync_to_async

    def cookie() -> str:
        browser = Client()
        browser.force_login(bob)
        return str(browser.cookies["sessionid"].value)

    sessionid = await database_sync_to_async(cookie)()
    socket = ws(session.id, headers={"Origin": origin, "Cookie": f"sessionid={sessionid}"})
    accepted, close_code = await socket.connect()
    assert not accepted or await socket.closed() in (4403, 4401)


@pytest.mark.django_db(transaction=True)
async def test_a_flood_of_streams_from_one_user_is_capped(
    alice: Any, bob: Any, carol: Any, charlie: Any, settings: Any
) -> None:
    bind_runtime()
    session = await create_shared_session(alice)
    settings.TANDEM_MAX_CONNECTIONS_PER_USER = 5
    opened, refused = [], 0
    for _ in range(30):
        client = sse(session.id, bob)
        status = await client.open()
        if status == 200:
            opened.append(client)
        else:
            assert status == 429
            assert (await client.json())["error"]["code"] == "too_many_connections"
            refused += 1
    assert len(opened) == 5 and refused == 25
    for client in opened:
        await client.close()
    # Every slot came back.
    again = sse(session.id, bob)
    await again.connected()
    await again.close()
