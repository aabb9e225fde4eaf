"""API keys: a user makes long-lived keys for programs (an MCP client's configuration, a
script), sends one as ``Authorization: Bearer tdm_…`` wherever an access token goes in
that header, and revokes it by deleting it. The key is shown once; only its digest is
stored. Roles and membership are checked as for any credential: alice owns the session,
bob collaborates, charlie is an outsider."""
from __future__ import annotations

import hashlib
from typing import Any

import pytest
from rest_framework.test import APIClient

from sessions_app import keys
from sessions_app.models import ApiKey
from tests.conftest import client_for
from tests.helpers import assert_error
from tests.streamutil import SSEClient, bind_runtime, stream_path

pytestmark = pytest.mark.django_db(transaction=True)

KEYS = "/api/auth/keys/"


def make_key(user: Any, name: str = "laptop") -> dict[str, Any]:
    response = client_for(user).post(KEYS, {"name": name}, format="json")
    assert response.status_code == 201, response.content
    return response.json()  # type: ignore[no-any-return]


def with_key(raw: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    return client


def test_a_key_is_shown_once_and_listed_without_it(alice: Any) -> None:
    made = make_key(alice, "claude code on my laptop")
    assert set(made) == {"id", "name", "prefix", "created_at", "last_used_at", "key"}
    assert made["last_used_at"] is None
    assert made["key"].startswith("tdm_") and len(made["key"]) > 40
    assert made["key"].startswith(made["prefix"]) and made["name"] == "claude code on my laptop"
    listed = client_for(alice).get(KEYS)
    assert listed.status_code == 200
    assert listed.json() == {"keys": [{k: v for k, v in made.items() if k != "key"}]}
    stored = ApiKey.objects.get(pk=made["id"])
    assert stored.digest == hashlib.sha256(made["key"].encode()).hexdigest()
    assert made["key"] not in {stored.digest, stored.prefix, stored.name}


def test_a_key_acts_as_its_user_with_that_users_roles(shared_session: Any, bob: Any, carol: Any, charlie: Any) -> None:
    sid = shared_session.id
    bobs = with_key(make_key(bob)["key"])
    assert [s["id"] for s in bobs.get("/api/sessions/").json()["results"]] == [sid]
    posted = bobs.post(f"/api/sessions/{sid}/messages/", {"parts": [{"type": "text", "text": "hi"}]}, format="json")
    assert posted.status_code == 202, posted.content
    assert posted.json()["message"]["author"]["username"] == "bob"
    carols = with_key(make_key(carol)["key"])  # a viewer reads, and may not write
    assert carols.get(f"/api/sessions/{sid}/messages/").status_code == 200
    refused = carols.post(f"/api/sessions/{sid}/messages/", {"parts": [{"type": "text", "text": "x"}]}, format="json")
    assert_error(refused, 403, "permission_denied")
    charlies = with_key(make_key(charlie)["key"])  # an outsider does not see the session
    assert_error(charlies.get(f"/api/sessions/{sid}/"), 404, "not_found")


def test_a_keys_last_use_is_listed_to_within_a_minute(alice: Any, shared_session: Any) -> None:
    from datetime import timedelta

    from django.utils import timezone

    made = make_key(alice)
    client = with_key(made["key"])

    def last_used() -> Any:
        [listed] = client_for(alice).get(KEYS).json()["keys"]
        return listed["last_used_at"]

    assert client.get("/api/sessions/").status_code == 200
    first = last_used()
    assert first is not None
    # Used again within the minute: not written again.
    assert client.get(f"/api/sessions/{shared_session.id}/").status_code == 200
    assert last_used() == first
    # A minute on, the next use is.
    ApiKey.objects.filter(pk=made["id"]).update(last_used_at=timezone.now() - timedelta(minutes=2))
    assert client.get("/api/sessions/").status_code == 200
    assert last_used() > first


def test_a_revoked_key_is_refused_at_once(alice: Any) -> None:
    made = make_key(alice)
    client = with_key(made["key"])
    assert client.get("/api/sessions/").status_code == 200
    assert client_for(alice).delete(f"{KEYS}{made['id']}/").status_code == 204
    refused = assert_error(client.get("/api/sessions/"), 401, "authentication_failed")
    assert "revoked" in refused["message"]
    assert client_for(alice).get(KEYS).json() == {"keys": []}


def test_a_user_cannot_see_or_revoke_anothers_keys(alice: Any, bob: Any) -> None:
    made = make_key(alice)
    assert client_for(bob).get(KEYS).json() == {"keys": []}
    assert_error(client_for(bob).delete(f"{KEYS}{made['id']}/"), 404, "not_found")
    assert_error(client_for(alice).delete(f"{KEYS}key_doesnotexist/"), 404, "not_found")
    assert with_key(made["key"]).get("/api/sessions/").status_code == 200  # still alice's


def test_keys_of_a_deactivated_or_deleted_user_are_refused(alice: Any, bob: Any) -> None:
    alices, bobs = make_key(alice)["key"], make_key(bob)["key"]
    alice.is_active = False
    alice.save(update_fields=["is_active"])
    assert_error(with_key(alices).get("/api/sessions/"), 401, "authentication_failed")
    bob.delete()
    assert_error(with_key(bobs).get("/api/sessions/"), 401, "authentication_failed")


@pytest.mark.parametrize(
    "raw", ["tdm_", "tdm_made-up-key", "tdm_" + "a" * 500, "tdm_\u00e9\u00e9", "tdm_x\ty"]
)
def test_made_up_keys_are_refused(alice: Any, raw: str) -> None:
    make_key(alice)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    response = client.get("/api/sessions/")
    assert response.status_code == 401, response.content
    assert response.json()["error"]["code"] == "authentication_failed"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "name"),
        ({"name": ""}, "name"),
        ({"name": "n" * 101}, "name"),
        ({"name": 7}, "name"),
        ({"name": None}, "name"),
        ({"name": "ok", "expires": "never"}, "expires"),
    ],
)
def test_bad_key_requests_get_a_validation_error_and_make_nothing(alice: Any, body: Any, field: str) -> None:
    error = assert_error(client_for(alice).post(KEYS, body, format="json"), 400, "validation_error")
    assert field in error["details"]
    assert not ApiKey.objects.exists()


def test_a_key_cannot_make_list_or_revoke_keys(alice: Any) -> None:
    # A leaked key must not mint keys that would outlive its revocation.
    made = make_key(alice)
    client = with_key(made["key"])
    assert_error(client.post(KEYS, {"name": "more"}, format="json"), 403, "permission_denied")
    assert_error(client.get(KEYS), 403, "permission_denied")
    assert_error(client.delete(f"{KEYS}{made['id']}/"), 403, "permission_denied")
    assert ApiKey.objects.count() == 1


def test_keys_are_made_only_by_a_signed_in_user(alice: Any) -> None:
    assert_error(APIClient().post(KEYS, {"name": "x"}, format="json"), 401, "not_authenticated")
    assert_error(APIClient().get(KEYS), 401, "not_authenticated")
    bad_json = client_for(alice).post(KEYS, "{not json", content_type="application/json")
    assert bad_json.status_code == 400
    assert not ApiKey.objects.exists()


def test_a_user_holds_a_bounded_number_of_keys(alice: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keys, "MAX_KEYS_PER_USER", 2)
    first = make_key(alice, "one")
    make_key(alice, "two")
    assert_error(client_for(alice).post(KEYS, {"name": "three"}, format="json"), 409, "conflict")
    client_for(alice).delete(f"{KEYS}{first['id']}/")
    make_key(alice, "three")


async def test_a_key_opens_a_stream_from_the_header_but_never_from_the_query_string(
    shared_session: Any, bob: Any
) -> None:
    from channels.db import database_sync_to_async

    bind_runtime()
    raw = (await database_sync_to_async(make_key)(bob))["key"]
    path = stream_path(shared_session.id)
    stream = SSEClient(path, headers={"authorization": f"Bearer {raw}"})
    connected = (await stream.connected()).data
    assert connected is not None and connected["type"] == "server.connected"
    await stream.close()
    # A long-lived secret stays out of URLs (and the logs and proxies that keep them).
    in_url = SSEClient(path, params={"token": raw})
    assert await in_url.open() == 401
    assert (await in_url.json())["error"]["code"] == "authentication_failed"


async def test_revoking_a_key_ends_every_stream_it_opened_and_no_other(shared_session: Any, bob: Any) -> None:
    from channels.db import database_sync_to_async

    from tests.conftest import token_for
    from tests.docpeer import DocPeer, InProcessTransport
    from tests.streamutil import WSClient, publish_many

    bind_runtime()
    sid = shared_session.id
    leaked = (await database_sync_to_async(make_key)(bob, "leaked"))["key"]
    other = (await database_sync_to_async(make_key)(bob, "other"))["key"]
    by_leaked = {"authorization": f"Bearer {leaked}"}
    ended_sse = [SSEClient(stream_path(sid), headers=by_leaked), SSEClient(stream_path(None), headers=by_leaked)]
    ended_ws = [
        WSClient(f"/ws/sessions/{sid}/", headers={"Authorization": f"Bearer {leaked}"}),
        WSClient("/ws/stream/", headers={"Authorization": f"Bearer {leaked}"}),
    ]
    doc = DocPeer(InProcessTransport(sid, {}, {"Authorization": f"Bearer {leaked}"}))
    kept = [
        SSEClient(stream_path(sid), headers={"authorization": f"Bearer {other}"}),
        SSEClient(stream_path(sid), params={"token": token_for(bob)}),
    ]
    for client in [*ended_sse, *kept]:
        await client.connected()
    for w in ended_ws:
        assert (await w.connect())[0]
        assert (await w.receive())["type"] == "server.connected"
    assert await doc.open() is None
    await doc.sync()

    response = await database_sync_to_async(client_for(bob).delete)(f"{KEYS}{(await _key_id(bob, 'leaked'))}/")
    assert response.status_code == 204
    for client in ended_sse:
        await client.ends()
    for w in ended_ws:
        assert await w.closed() == 4401
    assert await doc.until_closed() == 4401
    # bob's other credentials, his other key among them, carry on.
    [seq] = await publish_many(sid, 1)
    for client in kept:
        assert (await client.until_seq(seq))[-1].seq == seq
        await client.close()


async def test_a_ticket_asked_for_with_a_key_lives_and_dies_with_that_key(shared_session: Any, bob: Any) -> None:
    """A program with a key whose stream client uses tickets (the JS client does): its
    streams end when the key is revoked, and the ticket, still within its minute, opens
    nothing after that."""
    from channels.db import database_sync_to_async

    from tests.streamutil import WSClient

    bind_runtime()
    sid = shared_session.id
    made = await database_sync_to_async(make_key)(bob)

    def ticket() -> str:
        response = with_key(made["key"]).post("/api/auth/ticket/", format="json")
        assert response.status_code == 200, response.content
        return str(response.json()["ticket"])

    by_ticket = await database_sync_to_async(ticket)()
    sse = SSEClient(stream_path(sid), params={"ticket": by_ticket})
    await sse.connected()
    ws = WSClient(f"/ws/sessions/{sid}/", params={"ticket": by_ticket})
    assert (await ws.connect())[0]
    assert (await ws.receive())["type"] == "server.connected"
    response = await database_sync_to_async(client_for(bob).delete)(f"{KEYS}{made['id']}/")
    assert response.status_code == 204
    await sse.ends()
    assert await ws.closed() == 4401
    again = SSEClient(stream_path(sid), params={"ticket": by_ticket})
    assert await again.open() == 401
    assert (await again.json())["error"]["code"] == "authentication_failed"


async def _key_id(user: Any, name: str) -> str:
    from channels.db import database_sync_to_async

    return str(await database_sync_to_async(lambda: ApiKey.objects.get(user=user, name=name).pk)())


async def _key_revoked_once_looked_up(user: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    """A key of ``user`` that is revoked right after an opening stream's lookup has found
    it, before the stream listens (so the message that ends its streams passes unheard)."""
    from channels.db import database_sync_to_async

    from events_app import streams

    bind_runtime()
    made = await database_sync_to_async(make_key)(user)
    real = streams._lookup

    def then_revoke(items: list[Any]) -> list[Any]:
        out = real(items)
        keys.revoke_api_key(user, made["id"])
        return out

    monkeypatch.setattr(streams, "_lookup", then_revoke)
    return str(made["key"])


async def test_a_stream_whose_key_is_revoked_while_it_opens_is_refused(
    shared_session: Any, bob: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = await _key_revoked_once_looked_up(bob, monkeypatch)
    stream = SSEClient(stream_path(shared_session.id), headers={"authorization": f"Bearer {raw}"})
    assert await stream.open() == 401
    assert (await stream.json())["error"]["code"] == "authentication_failed"


async def test_a_document_socket_whose_key_is_revoked_while_it_opens_is_refused(
    shared_session: Any, bob: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.docpeer import DocPeer, InProcessTransport

    raw = await _key_revoked_once_looked_up(bob, monkeypatch)
    doc = DocPeer(InProcessTransport(shared_session.id, {}, {"Authorization": f"Bearer {raw}"}))
    await doc.open()
    assert await doc.until_closed() == 4401


# ---------------------------------------------------------------- the page


def test_the_keys_page_makes_a_key_shows_it_once_and_revokes_it(alice: Any) -> None:
    from django.test import Client

    browser = Client(enforce_csrf_checks=False)
    browser.force_login(alice)
    empty = browser.get("/accounts/keys/")
    assert empty.status_code == 200 and b"You have no API keys." in empty.content
    posted = browser.post("/accounts/keys/", {"name": "laptop"})
    assert posted.status_code == 302 and posted["Location"] == "/accounts/keys/"  # a reload makes none
    made = browser.get("/accounts/keys/")
    [key] = ApiKey.objects.filter(user=alice)
    raw = made.context["made"]
    assert raw.startswith(key.prefix) and raw.encode() in made.content
    assert b"never used" in made.content
    assert with_key(raw).get("/api/sessions/").status_code == 200
    again = browser.get("/accounts/keys/")
    assert raw.encode() not in again.content and key.prefix.encode() in again.content
    assert b"last used 0\xc2\xa0minutes ago" in again.content and b"never used" not in again.content
    revoked = browser.post(f"/accounts/keys/{key.id}/revoke/")
    assert revoked.status_code == 302 and revoked["Location"] == "/accounts/keys/"
    assert_error(with_key(raw).get("/api/sessions/"), 401, "authentication_failed")


def test_the_keys_page_refuses_what_it_should(alice: Any, bob: Any) -> None:
    from django.test import Client

    assert Client().get("/accounts/keys/").status_code == 302  # to the login page
    bobs = ApiKey.objects.get(pk=make_key(bob)["id"])
    browser = Client()
    browser.force_login(alice)
    assert browser.post("/accounts/keys/", {"name": ""}).context["form"].errors["name"]
    assert browser.post("/accounts/keys/", {"name": "n" * 101}).context["form"].errors["name"]
    assert browser.post(f"/accounts/keys/{bobs.id}/revoke/").status_code == 404  # not hers
    assert browser.get(f"/accounts/keys/{bobs.id}/revoke/").status_code == 405
    assert list(ApiKey.objects.all()) == [bobs]
    guarded = Client(enforce_csrf_checks=True)
    guarded.force_login(alice)
    assert guarded.post("/accounts/keys/", {"name": "x"}).status_code == 403  # no CSRF token
    assert list(ApiKey.objects.all()) == [bobs]
