"""Deactivating or deleting a user ends every stream of theirs at once, on every process,
whatever admitted it (issue 10, item 5); their refresh tokens get 401, never a 500.
Revoking one API key ends the streams that key opened, and only those."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from typing import Any

import pytest
from channels.db import database_sync_to_async
from rest_framework.test import APIClient
from rest_framework_simplejwt.tokens import RefreshToken

from project.auth import issue_ticket
from tests import conftest
from tests.conftest import ROOT, token_for
from tests.helpers import assert_error
from tests.streamutil import SSEClient, WSClient, bind_runtime, create_shared_session, stream_path


def _session_cookie(user: Any) -> str:
    from django.test import Client

    client = Client()
    client.force_login(user)
    return str(client.cookies["sessionid"].value)


# ---------------------------------------------------------------- refresh


@pytest.mark.django_db
@pytest.mark.parametrize("change", ["delete", "deactivate"])
def test_refresh_token_of_a_deleted_or_deactivated_user_is_401(alice: Any, change: str) -> None:
    refresh = str(RefreshToken.for_user(alice))
    if change == "delete":
        alice.delete()
    else:
        alice.is_active = False
        alice.save()
    response = APIClient().post("/api/auth/token/refresh/", {"refresh": refresh}, format="json")
    assert_error(response, 401, "authentication_failed")


# ---------------------------------------------------------------- one process


async def _bobs_streams(session_id: str, bob: Any) -> tuple[list[SSEClient], list[WSClient]]:
    """bob's streams, one per way in: session and user level, SSE and WebSocket, by
    ticket, cookie, ?token= and Bearer header."""
    cookie = await database_sync_to_async(_session_cookie)(bob)
    ticket = await database_sync_to_async(issue_ticket)(bob.pk)
    sse = [
        SSEClient(stream_path(session_id), params={"ticket": ticket}),
        SSEClient(stream_path(None), headers={"Cookie": f"sessionid={cookie}"}),
    ]
    ws = [
        WSClient(f"/ws/sessions/{session_id}/", params={"token": token_for(bob)}),
        WSClient(
            f"/ws/sessions/{session_id}/",
            headers={"Origin": "http://127.0.0.1:8000", "Host": "127.0.0.1:8000", "Cookie": f"sessionid={cookie}"},
        ),
        WSClient("/ws/stream/", headers={"Authorization": f"Bearer {token_for(bob)}"}),
    ]
    for client in sse:
        await client.connected()
    for client in ws:
        accepted, _ = await client.connect()
        assert accepted
        assert (await client.receive())["type"] == "server.connected"
    return sse, ws


async def _assert_all_ended(sse: list[SSEClient], ws: list[WSClient]) -> None:
    for client in ws:
        assert await client.closed() == 4401
    for client in sse:
        await client.ends()


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("change", ["deactivate", "delete"])
async def test_every_stream_of_a_disabled_user_ends(
    alice: Any, bob: Any, carol: Any, charlie: Any, change: str
) -> None:
    bind_runtime()
    session = await create_shared_session(alice)
    sse, ws = await _bobs_streams(session.id, bob)
    watcher = SSEClient(stream_path(session.id), params={"token": token_for(alice)})
    await watcher.connected()

    def disable() -> None:
        if change == "delete":
            bob.delete()
        else:
            bob.is_active = False
            bob.save()

    await database_sync_to_async(disable)()
    await _assert_all_ended(sse, ws)
    # The session and its other members carry on.
    from tests.streamutil import publish_many

    [seq] = await publish_many(session.id, 1)
    assert (await watcher.until_seq(seq))[-1].seq == seq
    await watcher.close()


@pytest.mark.django_db(transaction=True)
async def test_saving_an_active_user_ends_nothing(alice: Any, bob: Any, carol: Any, charlie: Any) -> None:
    bind_runtime()
    session = await create_shared_session(alice)
    sse, ws = await _bobs_streams(session.id, bob)

    def rename() -> None:
        bob.first_name = "Bob"
        bob.save()

    await database_sync_to_async(rename)()
    from tests.streamutil import publish_many

    [seq] = await publish_many(session.id, 1)
    for client in sse[:1]:
        assert (await client.until_seq(seq))[-1].seq == seq
    for client in ws[:1]:
        assert (await client.seen(lambda f: f.get("seq") == seq))["seq"] == seq
    for client in sse:
        await client.close()
    for client in ws:
        await client.disconnect()


# ---------------------------------------------------------------- every process


class _Socket:
    """A real WebSocket client (the ``websockets`` package) that records how it ended."""

    def __init__(self, url: str, **kwargs: Any) -> None:
        self.code: int | None = None
        self.first: Any = None
        self.ready = threading.Event()
        self.done = threading.Event()
        threading.Thread(target=self._run, args=(url, kwargs), daemon=True).start()
        assert self.ready.wait(10) and '"server.connected"' in str(self.first), self.first

    def _run(self, url: str, kwargs: dict[str, Any]) -> None:
        from websockets.exceptions import ConnectionClosed
        from websockets.sync.client import connect

        try:
            with connect(url, open_timeout=10, **kwargs) as socket:
                self.first = socket.recv(timeout=10)
                self.ready.set()
                while True:
                    socket.recv(timeout=30)
        except ConnectionClosed as closed:
            self.code = closed.rcvd.code if closed.rcvd else None
        except Exception as exc:  # noqa: BLE001 - reported by the waiting test
            self.first = self.first or exc
        finally:
            self.ready.set()
            self.done.set()


def _manage_shell(servers: Any, code: str) -> None:
    """What an operator runs: ``manage.py shell -c``, its own process."""
    env = {**os.environ, **servers.env(), "DATABASE_URL": conftest.test_database_url(), "DJANGO_SETTINGS_MODULE": "project.settings"}
    result = subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _streams_on_two_processes(
    first: Any, second: Any, session_id: str, bob: Any, sse_streams: Any
) -> tuple[list[Any], list[_Socket]]:
    import httpx

    ticket = httpx.post(
        f"{first.url}/api/auth/ticket/", headers={"Authorization": f"Bearer {token_for(bob)}"}, timeout=10
    ).json()["ticket"]
    cookie = _session_cookie(bob)
    sse = [
        sse_streams(first.url, f"/api/sessions/{session_id}/stream/?ticket={ticket}"),
        sse_streams(second.url, f"/api/stream/?token={token_for(bob)}"),
        sse_streams(first.url, "/api/stream/", headers={"Cookie": f"sessionid={cookie}"}),
    ]
    for stream in sse:
        assert stream.status == 200
        stream.wait_for_type("server.connected")
    host = f"127.0.0.1:{second.port}"
    ws = [
        _Socket(f"ws://{host}/ws/sessions/{session_id}/", origin=f"http://{host}", additional_headers={"Cookie": f"sessionid={cookie}"}),
        _Socket(f"ws://127.0.0.1:{first.port}/ws/stream/", additional_headers={"Authorization": f"Bearer {token_for(bob)}"}),
        _Socket(f"ws://{host}/ws/sessions/{session_id}/?ticket={ticket}"),
    ]
    return sse, ws


def _assert_every_stream_ended(sse: list[Any], ws: list[_Socket]) -> None:
    for stream in sse:
        stream.wait_for(lambda _, s=stream: s.ended, timeout=3.0)
    for socket in ws:
        assert socket.done.wait(3.0)
        assert socket.code == 4401


@pytest.mark.slow
@pytest.mark.redis
def test_deactivating_a_user_ends_their_streams_on_every_process(
    servers: Any, shared_session: Any, bob: Any, sse_streams: Any
) -> None:
    first, second = servers(2, redis=True)
    sse, ws = _streams_on_two_processes(first, second, shared_session.id, bob, sse_streams)
    _manage_shell(
        servers,
        "from django.contrib.auth.models import User; u = User.objects.get(username='bob'); "
        "u.is_active = False; u.save()",
    )
    _assert_every_stream_ended(sse, ws)


@pytest.mark.slow
@pytest.mark.redis
def test_deleting_a_user_ends_their_streams_on_every_process(
    servers: Any, shared_session: Any, alice: Any, bob: Any, sse_streams: Any
) -> None:
    from sessions_app import services

    owned = services.create_session(bob, title="bob's", agent="echo")
    services.add_member(owned, username="alice", role="editor")
    first, second = servers(2, redis=True)
    sse, ws = _streams_on_two_processes(first, second, shared_session.id, bob, sse_streams)
    # alice follows the session bob owns: deleting bob deletes it, and she is told so.
    watcher = sse_streams(second.url, f"/api/sessions/{owned.id}/stream/?token={token_for(alice)}")
    watcher.wait_for_type("server.connected")
    _manage_shell(servers, "from django.contrib.auth.models import User; User.objects.get(username='bob').delete()")
    _assert_every_stream_ended(sse, ws)
    watcher.wait_for_type("session.deleted", timeout=3.0, session_id=owned.id)
    watcher.wait_for(lambda _: watcher.ended, timeout=3.0)


@pytest.mark.slow
@pytest.mark.redis
def test_revoking_an_api_key_ends_its_streams_on_every_process_and_no_others(
    servers: Any, shared_session: Any, bob: Any, sse_streams: Any
) -> None:
    import httpx

    from sessions_app import services

    first, second = servers(2, redis=True)
    leaked, raw = services.create_api_key(bob, "leaked")
    _, other = services.create_api_key(bob, "other")
    sid = shared_session.id
    sse = [
        sse_streams(first.url, f"/api/sessions/{sid}/stream/", headers={"Authorization": f"Bearer {raw}"}),
        sse_streams(second.url, "/api/stream/", headers={"Authorization": f"Bearer {raw}"}),
    ]
    kept = sse_streams(second.url, f"/api/sessions/{sid}/stream/", headers={"Authorization": f"Bearer {other}"})
    for stream in [*sse, kept]:
        assert stream.status == 200
        stream.wait_for_type("server.connected")
    ws = [
        _Socket(f"ws://127.0.0.1:{second.port}/ws/sessions/{sid}/", additional_headers={"Authorization": f"Bearer {raw}"}),
        _Socket(f"ws://127.0.0.1:{first.port}/ws/stream/", additional_headers={"Authorization": f"Bearer {raw}"}),
    ]
    # bob revokes it through the first process's REST API, signed in with a token.
    revoked = httpx.delete(
        f"{first.url}/api/auth/keys/{leaked.pk}/", headers={"Authorization": f"Bearer {token_for(bob)}"}, timeout=10
    )
    assert revoked.status_code == 204
    _assert_every_stream_ended(sse, ws)
    again = httpx.get(f"{second.url}/api/sessions/", headers={"Authorization": f"Bearer {raw}"}, timeout=10)
    assert again.status_code == 401
    # His other key's stream carries on, and hears what happens next.
    posted = httpx.post(
        f"{second.url}/api/sessions/{sid}/messages/", headers={"Authorization": f"Bearer {other}"},
        json={"parts": [{"type": "text", "text": "still here"}]}, timeout=10,
    )
    assert posted.status_code == 202
    kept.wait_for_type("message.created", timeout=5.0)
    assert not kept.ended
