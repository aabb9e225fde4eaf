"""Cross-site WebSocket hijacking (issue 10, item 1). A handshake with an ``Origin`` must
come from exactly the server's own origin (scheme, host and port, as Django's CSRF check
compares them) or one of TANDEM_ALLOWED_ORIGINS, whatever credential it carries; one
without an ``Origin`` is a program, and authenticates by token or ticket only."""
from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from channels.db import database_sync_to_async

from project.auth import issue_ticket
from tests.conftest import token_for
from tests.streamutil import WSClient, bind_runtime, create_shared_session

pytestmark = pytest.mark.django_db(transaction=True)

SERVER = "127.0.0.1:8321"


@pytest.fixture
async def session(alice: Any, bob: Any, carol: Any, charlie: Any) -> AsyncIterator[Any]:
    bind_runtime()
    yield await create_shared_session(alice)


def _session_cookie(user: Any) -> str:
    from django.test import Client

    client = Client()
    client.force_login(user)
    return str(client.cookies["sessionid"].value)


async def handshake(
    session_id: str, *, origin: str | None, host: str = SERVER, scheme: str = "ws",
    cookie_of: Any = None, headers: dict[str, str] | None = None, **params: str,
) -> WSClient:
    all_headers = {"Host": host, **(headers or {})}
    if origin is not None:
        all_headers["Origin"] = origin
    if cookie_of is not None:
        all_headers["Cookie"] = f"sessionid={await database_sync_to_async(_session_cookie)(cookie_of)}"
    client = WSClient(f"/ws/sessions/{session_id}/", params=params, headers=all_headers)
    client.comm.scope["scheme"] = scheme
    return client


async def publishes(client: WSClient) -> bool:
    """Whether the socket opened as its user and could publish into the session."""
    accepted, _ = await client.connect()
    if not accepted:
        return False
    hello = await client.receive()
    if hello["type"] != "server.connected":
        return False
    await client.send({"type": "publish", "id": "p", "event": {"type": "task.note", "properties": {}}})
    reply = await client.seen(lambda f: f.get("id") == "p")
    await client.disconnect()
    return reply["type"] == "ack"


async def test_cookie_from_the_servers_own_origin_publishes(session: Any, bob: Any) -> None:
    assert await publishes(await handshake(session.id, origin=f"http://{SERVER}", cookie_of=bob))


@pytest.mark.parametrize(
    "origin",
    [
        "http://127.0.0.1:18399",  # the same host on another port: the reported attack
        "http://127.0.0.1",  # the default port is another port too
        "https://127.0.0.1:8321",  # another scheme
        "http://localhost:8321",  # another host, although it is in ALLOWED_HOSTS
    ],
)
async def test_cookie_from_another_port_scheme_or_host_is_refused(session: Any, bob: Any, origin: str) -> None:
    client = await handshake(session.id, origin=origin, cookie_of=bob)
    accepted, _ = await client.connect()
    assert not accepted


async def test_cookie_from_an_allowed_origin_publishes(session: Any, bob: Any, settings: Any) -> None:
    settings.CSRF_TRUSTED_ORIGINS = ["http://127.0.0.1:18399"]
    assert await publishes(await handshake(session.id, origin="http://127.0.0.1:18399", cookie_of=bob))


async def test_a_host_outside_allowed_hosts_is_refused_even_when_origin_matches_it(session: Any, bob: Any) -> None:
    # DNS rebinding: evil.example resolved to this server; its page is same-origin with itself.
    client = await handshake(session.id, origin="http://evil.example", host="evil.example", cookie_of=bob)
    accepted, _ = await client.connect()
    assert not accepted


async def test_behind_a_tls_proxy_the_https_origin_is_the_servers_own(session: Any, bob: Any, settings: Any) -> None:
    settings.ALLOWED_HOSTS = ["tandem.example.com"]
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    proxied = {"X-Forwarded-Proto": "https"}
    ok = await handshake(
        session.id, origin="https://tandem.example.com", host="tandem.example.com", cookie_of=bob, headers=proxied
    )
    assert await publishes(ok)
    plain = await handshake(
        session.id, origin="http://tandem.example.com", host="tandem.example.com", cookie_of=bob, headers=proxied
    )
    assert not (await plain.connect())[0]


async def test_token_or_ticket_with_a_foreign_origin_is_refused(session: Any, bob: Any) -> None:
    for credential in ({"token": token_for(bob)}, {"ticket": issue_ticket(bob.pk)}):
        client = await handshake(session.id, origin="http://127.0.0.1:18399", **credential)
        accepted, _ = await client.connect()
        assert not accepted, credential


async def test_token_or_ticket_without_origin_publishes(session: Any, bob: Any) -> None:
    for credential in ({"token": token_for(bob)}, {"ticket": issue_ticket(bob.pk)}):
        assert await publishes(await handshake(session.id, origin=None, **credential)), credential


async def test_token_from_an_allowed_origin_publishes(session: Any, bob: Any, settings: Any) -> None:
    settings.CSRF_TRUSTED_ORIGINS = ["https://app.example.com"]
    client = await handshake(session.id, origin="https://app.example.com", token=token_for(bob))
    assert await publishes(client)
