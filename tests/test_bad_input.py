"""§2 bad input on every REST endpoint: always a 4xx in the one error shape, never a 500
or an HTML page, and never a change to what is stored."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
import pytest
from django.contrib.auth import get_user_model
from rest_framework.test import APIClient

from events_app.models import Event
from sessions_app.models import Membership, Message, Part, Session
from tests.conftest import PASSWORD
from tests.helpers import assert_error

pytestmark = pytest.mark.django_db

SID = "{sid}"

# Every endpoint that takes a JSON body, with a body it would accept.
BODY_ENDPOINTS: list[tuple[str, str, dict[str, Any]]] = [
    ("post", "/api/auth/token/", {"username": "alice", "password": PASSWORD}),
    ("post", "/api/auth/token/refresh/", {"refresh": "x"}),
    ("post", "/api/auth/register/", {"username": "dora", "password": "plum-orbit-lantern-72"}),
    ("post", "/api/auth/ticket/", {}),
    ("post", "/api/sessions/", {"title": "t"}),
    ("patch", f"/api/sessions/{SID}/", {"title": "t"}),
    ("post", f"/api/sessions/{SID}/members/", {"username": "charlie", "role": "viewer"}),
    ("post", f"/api/sessions/{SID}/messages/", {"parts": [{"type": "text", "text": "hi"}]}),
    ("post", f"/api/sessions/{SID}/abort/", {}),
    ("post", f"/api/sessions/{SID}/events/", {"type": "task.progress", "properties": {}}),
    ("post", f"/api/sessions/{SID}/permissions/per_unknown/", {"approved": True}),
]

# Endpoints whose body is checked field by field (token endpoints are simplejwt's own).
STRICT_ENDPOINTS = [e for e in BODY_ENDPOINTS if not e[1].startswith("/api/auth/token/")]

# Every session-scoped endpoint, with a method the route supports.
SESSION_ENDPOINTS: list[tuple[str, str]] = [
    ("get", "/api/sessions/{sid}/"),
    ("patch", "/api/sessions/{sid}/"),
    ("delete", "/api/sessions/{sid}/"),
    ("get", "/api/sessions/{sid}/members/"),
    ("post", "/api/sessions/{sid}/members/"),
    ("delete", "/api/sessions/{sid}/members/bob/"),
    ("get", "/api/sessions/{sid}/presence/"),
    ("get", "/api/sessions/{sid}/health/"),
    ("get", "/api/sessions/{sid}/messages/"),
    ("post", "/api/sessions/{sid}/messages/"),
    ("post", "/api/sessions/{sid}/abort/"),
    ("get", "/api/sessions/{sid}/events/"),
    ("post", "/api/sessions/{sid}/events/"),
    ("get", "/api/sessions/{sid}/permissions/"),
    ("post", "/api/sessions/{sid}/permissions/per_unknown/"),
]

WRONG_METHODS: list[tuple[str, str]] = [
    ("get", "/api/auth/token/"),
    ("put", "/api/auth/token/refresh/"),
    ("get", "/api/auth/register/"),
    ("get", "/api/auth/ticket/"),
    ("delete", "/api/sessions/"),
    ("put", "/api/sessions/"),
    ("post", "/api/sessions/{sid}/"),
    ("put", "/api/sessions/{sid}/"),
    ("delete", "/api/sessions/{sid}/members/"),
    ("get", "/api/sessions/{sid}/members/bob/"),
    ("patch", "/api/sessions/{sid}/members/bob/"),
    ("post", "/api/sessions/{sid}/presence/"),
    ("delete", "/api/sessions/{sid}/health/"),
    ("put", "/api/sessions/{sid}/messages/"),
    ("delete", "/api/sessions/{sid}/messages/"),
    ("get", "/api/sessions/{sid}/abort/"),
    ("delete", "/api/sessions/{sid}/events/"),
    ("patch", "/api/sessions/{sid}/events/"),
    ("post", "/api/sessions/{sid}/permissions/"),
    ("get", "/api/sessions/{sid}/permissions/per_unknown/"),
]


def snapshot() -> dict[str, Any]:
    """Everything a bad request must leave alone."""
    return {
        "users": sorted(get_user_model().objects.values_list("username", "is_active")),
        "sessions": sorted(Session.objects.values_list("id", "title", "agent", "last_seq")),
        "statuses": sorted(str(s) for s in Session.objects.values_list("status", flat=True)),
        "members": sorted(Membership.objects.values_list("session_id", "user__username", "role")),
        "messages": sorted(Message.objects.values_list("id", "status")),
        "parts": sorted(Part.objects.values_list("id", "text")),
        "events": sorted(Event.objects.values_list("session_id", "seq")),
    }


@pytest.fixture
def alice_client(shared_session: Any, alice: Any, api: Any) -> APIClient:
    client: APIClient = api(alice)
    return client


@pytest.fixture
def unchanged(shared_session: Any) -> Any:
    """Call the returned function at the end of a test: nothing stored has changed."""
    before = snapshot()

    def check() -> None:
        assert snapshot() == before

    return check


def send(client: APIClient, method: str, path: str, body: bytes, content_type: str, **extra: Any) -> Any:
    return client.generic(method.upper(), path, body, content_type=content_type, **extra)


def fill(path: str, session: Any) -> str:
    return path.replace(SID, session.id)


# ---------------------------------------------------------------- bodies that are not JSON objects


@pytest.mark.parametrize("method, path, _ok", BODY_ENDPOINTS)
@pytest.mark.parametrize(
    "raw",
    [b"{", b'{"title": }', b"{'single': 1}", b'{"a": 1,}', b"not json", b"\xff\xfe{}", b'{"a": NaN}', b'{"a": Infinity}',
     b'{"a": 1} trailing'],
)
def test_malformed_json_is_400_bad_request(
    alice_client: APIClient, shared_session: Any, unchanged: Callable[[], None],
    method: str, path: str, _ok: Any, raw: bytes,
) -> None:
    assert_error(send(alice_client, method, fill(path, shared_session), raw, "application/json"), 400, "bad_request")
    unchanged()


@pytest.mark.parametrize("method, path, _ok", BODY_ENDPOINTS)
@pytest.mark.parametrize("raw", [b"[]", b'[{"title": "x"}]', b'"title"', b"42", b"null", b"true"])
def test_json_that_is_not_an_object_is_400(
    alice_client: APIClient, shared_session: Any, unchanged: Callable[[], None],
    method: str, path: str, _ok: Any, raw: bytes,
) -> None:
    assert_error(send(alice_client, method, fill(path, shared_session), raw, "application/json"), 400, "bad_request")
    unchanged()


@pytest.mark.parametrize("method, path, _ok", BODY_ENDPOINTS)
def test_deeply_nested_json_is_400_not_500(
    alice_client: APIClient, shared_session: Any, unchanged: Callable[[], None], method: str, path: str, _ok: Any,
) -> None:
    raw = b'{"x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    assert_error(send(alice_client, method, fill(path, shared_session), raw, "application/json"), 400, "bad_request")
    unchanged()


@pytest.mark.parametrize("method, path, ok", BODY_ENDPOINTS)
def test_lone_surrogates_are_400_not_500(
    alice_client: APIClient, shared_session: Any, unchanged: Callable[[], None], method: str, path: str, ok: Any,
) -> None:
    raw = orjson.dumps({**ok, "x": "SURROGATE"}).replace(b"SURROGATE", b"\\ud800")
    assert_error(send(alice_client, method, fill(path, shared_session), raw, "application/json"), 400, "bad_request")
    unchanged()


def test_token_endpoint_with_a_surrogate_username_is_400_not_500(alice: Any) -> None:
    raw = b'{"username": "al\\udc00ice", "password": "x"}'
    assert_error(send(APIClient(), "post", "/api/auth/token/", raw, "application/json"), 400, "bad_request")


# ---------------------------------------------------------------- unknown fields and wrong types


@pytest.mark.parametrize("method, path, ok", STRICT_ENDPOINTS)
def test_unknown_fields_are_400_naming_the_field(
    alice_client: APIClient, shared_session: Any, unchanged: Callable[[], None], method: str, path: str, ok: Any,
) -> None:
    response = getattr(alice_client, method)(fill(path, shared_session), {**ok, "bogus_field": 1}, format="json")
    error = assert_error(response, 400, "validation_error")
    assert "bogus_field" in error["details"]
    unchanged()


@pytest.mark.parametrize("method, path, ok", [e for e in STRICT_ENDPOINTS if e[2]])
@pytest.mark.parametrize("bad", [None, 12, 1.5, True, [], {}, ["x"]])
def test_wrong_types_for_every_field_are_400_naming_it(
    alice_client: APIClient, shared_session: Any, unchanged: Callable[[], None],
    method: str, path: str, ok: dict[str, Any], bad: Any,
) -> None:
    for field in ok:
        if field == "properties" and bad == {}:
            continue  # an empty object is a valid properties value
        if isinstance(ok[field], bool) and isinstance(bad, bool):
            continue  # the right type
        response = getattr(alice_client, method)(fill(path, shared_session), {**ok, field: bad}, format="json")
        error = assert_error(response, 400, "validation_error")
        assert field in error["details"], (field, error)
    unchanged()


def test_token_endpoint_with_wrong_types_is_400(alice: Any) -> None:
    response = APIClient().post("/api/auth/token/", {"username": ["alice"], "password": PASSWORD}, format="json")
    error = assert_error(response, 400, "validation_error")
    assert "username" in error["details"]


# ---------------------------------------------------------------- content types


@pytest.mark.parametrize("method, path, _ok", BODY_ENDPOINTS)
@pytest.mark.parametrize(
    "content_type, raw",
    [
        ("text/plain", b'{"title": "x"}'),
        ("application/x-www-form-urlencoded", b"title=x&username=alice"),
        (
            "multipart/form-data; boundary=BoUnDaRy",
            b'--BoUnDaRy\r\nContent-Disposition: form-data; name="title"\r\n\r\nx\r\n--BoUnDaRy--\r\n',
        ),
        ("application/xml", b"<title>x</title>"),
        ("application/octet-stream", b"\x00\x01"),
    ],
)
def test_wrong_content_type_is_415(
    alice_client: APIClient, shared_session: Any, unchanged: Callable[[], None],
    method: str, path: str, _ok: Any, content_type: str, raw: bytes,
) -> None:
    assert_error(send(alice_client, method, fill(path, shared_session), raw, content_type), 415, "unsupported_media_type")
    unchanged()


def test_form_post_from_the_test_client_is_415(alice_client: APIClient, unchanged: Callable[[], None]) -> None:
    assert_error(alice_client.post("/api/sessions/", {"title": "x"}), 415, "unsupported_media_type")
    unchanged()


# ---------------------------------------------------------------- size


@pytest.mark.parametrize("method, path, ok", BODY_ENDPOINTS)
def test_oversized_body_is_413(
    alice_client: APIClient, shared_session: Any, unchanged: Callable[[], None], method: str, path: str, ok: Any,
    settings: Any,
) -> None:
    raw = orjson.dumps({**ok, "padding": "x" * (settings.DATA_UPLOAD_MAX_MEMORY_SIZE + 10)})
    assert_error(send(alice_client, method, fill(path, shared_session), raw, "application/json"), 413, "payload_too_large")
    unchanged()


def test_oversized_body_is_413_before_authentication(shared_session: Any, unchanged: Callable[[], None], settings: Any) -> None:
    raw = b'{"title": "' + b"x" * (settings.DATA_UPLOAD_MAX_MEMORY_SIZE + 10) + b'"}'
    assert_error(send(APIClient(), "post", "/api/sessions/", raw, "application/json"), 413, "payload_too_large")
    unchanged()


def test_a_content_length_that_is_not_a_number_is_400(alice_client: APIClient, unchanged: Callable[[], None]) -> None:
    response = send(alice_client, "post", "/api/sessions/", b"{}", "application/json", CONTENT_LENGTH="lots")
    assert_error(response, 400, "bad_request")
    unchanged()


def test_a_content_length_claiming_a_huge_body_is_413(alice_client: APIClient, unchanged: Callable[[], None]) -> None:
    response = send(alice_client, "post", "/api/sessions/", b"{}", "application/json", CONTENT_LENGTH=str(10**12))
    assert_error(response, 413, "payload_too_large")
    unchanged()


# ---------------------------------------------------------------- ids


BAD_SESSION_IDS = [
    "ses_00000000000000000000",
    "nope",
    "x" * 33,
    "x" * 2000,
    "ses_%C3%A9%C3%A9",
    "ses%00abc",
    "%00",
    "ses_%0A",
    "%F0%9F%98%80",
    "1",
    "-1",
    "'%20OR%201=1--",
]


@pytest.mark.parametrize("method, path", SESSION_ENDPOINTS)
@pytest.mark.parametrize("bad_id", BAD_SESSION_IDS)
def test_bad_session_ids_are_404(
    alice_client: APIClient, unchanged: Callable[[], None], method: str, path: str, bad_id: str,
) -> None:
    response = getattr(alice_client, method)(path.replace("{sid}", bad_id), {}, format="json")
    assert_error(response, 404, "not_found")
    unchanged()


@pytest.mark.parametrize("username", ["nobody", "%00", "bob%00", "x" * 500, "%C3%A9", "bob%20"])
def test_removing_a_bad_username_is_404(
    alice_client: APIClient, shared_session: Any, unchanged: Callable[[], None], username: str,
) -> None:
    assert_error(alice_client.delete(f"/api/sessions/{shared_session.id}/members/{username}/"), 404, "not_found")
    unchanged()


@pytest.mark.parametrize("username", ["nobody", "x" * 151, "bob\x00"])
def test_adding_a_bad_username_is_400(
    alice_client: APIClient, shared_session: Any, unchanged: Callable[[], None], username: str,
) -> None:
    response = alice_client.post(
        f"/api/sessions/{shared_session.id}/members/", {"username": username, "role": "viewer"}, format="json"
    )
    error = assert_error(response, 400, "validation_error")
    assert "username" in error["details"]
    unchanged()


@pytest.mark.parametrize("query", ["after=%00", "limit=%00", "types=task.%00", "after=1&after=x", "cursor=%00abc"])
def test_bad_query_parameters_on_events_are_400(
    alice_client: APIClient, shared_session: Any, query: str,
) -> None:
    assert_error(alice_client.get(f"/api/sessions/{shared_session.id}/events/?{query}"), 400, "bad_request")


@pytest.mark.parametrize("path", ["/api/sessions/", "/api/sessions/{sid}/messages/"])
@pytest.mark.parametrize("cursor", ["%00", "abc", "cD0lMDA%3D", "cj0xJnA9eA%3D%3D", "bz05OTk5OTk5OTk5OTk5OTk5OTk5OTk%3D"])
def test_bad_cursors_are_4xx_not_500(alice_client: APIClient, shared_session: Any, path: str, cursor: str) -> None:
    response = alice_client.get(path.replace("{sid}", shared_session.id) + f"?cursor={cursor}")
    if response.status_code == 200:
        # Message pages also link back (`previous`).
        assert set(response.json()) - {"previous"} == {"results", "next"}
    else:
        assert_error(response, 400, "bad_request")


# ---------------------------------------------------------------- unknown URLs and methods


@pytest.mark.parametrize(
    "path",
    ["/api/", "/api/nope/", "/api/sessions", "/api/sessions/{sid}/nope/", "/api/sessions/{sid}/members/bob/x/",
     "/api/auth/", "/api/auth/token", "/api/v2/sessions/", "/api/%00/"],
)
@pytest.mark.parametrize("method", ["get", "post", "put", "patch", "delete"])
def test_unknown_api_urls_are_404_in_the_error_shape(
    alice_client: APIClient, shared_session: Any, unchanged: Callable[[], None], path: str, method: str,
) -> None:
    response = getattr(alice_client, method)(path.replace("{sid}", shared_session.id), {}, format="json")
    assert_error(response, 404, "not_found")
    unchanged()


def test_unknown_api_url_is_404_for_anonymous_callers(db: None) -> None:
    assert_error(APIClient().get("/api/nope/"), 404, "not_found")


@pytest.mark.parametrize("method", ["post", "put", "patch", "delete"])
def test_unknown_api_url_is_404_even_when_csrf_is_enforced(alice: Any, method: str) -> None:
    client = APIClient(enforce_csrf_checks=True)
    assert_error(getattr(client, method)("/api/nope/", {}, format="json"), 404, "not_found")
    assert client.login(username="alice", password=PASSWORD)
    assert_error(getattr(client, method)("/api/nope/", {}, format="json"), 404, "not_found")


@pytest.mark.parametrize("method, path", WRONG_METHODS)
def test_wrong_method_is_405_in_the_error_shape(
    alice_client: APIClient, shared_session: Any, unchanged: Callable[[], None], method: str, path: str,
) -> None:
    full = path.replace("{sid}", shared_session.id)
    response = getattr(alice_client, method)(full, {}, format="json")
    assert_error(response, 405, "method_not_allowed")
    assert "Allow" in response
    unchanged()


# ---------------------------------------------------------------- no credentials on any endpoint


@pytest.mark.parametrize(
    "method, path",
    SESSION_ENDPOINTS + [("get", "/api/sessions/"), ("post", "/api/sessions/"), ("post", "/api/auth/ticket/")],
)
def test_every_protected_endpoint_needs_credentials(
    shared_session: Any, unchanged: Callable[[], None], method: str, path: str,
) -> None:
    response = getattr(APIClient(), method)(path.replace("{sid}", shared_session.id), {}, format="json")
    assert_error(response, 401, "not_authenticated")
    unchanged()


@pytest.mark.parametrize("method, path", SESSION_ENDPOINTS)
def test_outsider_gets_404_on_every_session_endpoint(
    shared_session: Any, charlie: Any, api: Any, unchanged: Callable[[], None], method: str, path: str,
) -> None:
    response = getattr(api(charlie), method)(path.replace("{sid}", shared_session.id), {}, format="json")
    assert_error(response, 404, "not_found")
    unchanged()
