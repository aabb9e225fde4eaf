"""§3 members: list, add and remove, owner only, and what a removed member sees."""
from __future__ import annotations

from typing import Any

import pytest

from events_app.models import Event
from sessions_app.models import Membership
from tests.conftest import make_user
from tests.helpers import assert_error

pytestmark = pytest.mark.django_db


def members_url(session: Any, username: str | None = None) -> str:
    base = f"/api/sessions/{session.id}/members/"
    return base if username is None else f"{base}{username}/"


def roles(session: Any) -> dict[str, str]:
    return {m.user.username: m.role for m in Membership.objects.filter(session=session).select_related("user")}


# ---------------------------------------------------------------- list


@pytest.mark.parametrize("who", ["alice", "bob", "carol"])
def test_every_member_lists_the_members(shared_session: Any, api: Any, request: Any, who: str) -> None:
    response = api(request.getfixturevalue(who)).get(members_url(shared_session))
    assert response.status_code == 200
    body = response.json()
    assert isinstance(body, list)  # members are a plain array, not paginated
    assert [(m["user"]["username"], m["role"]) for m in body] == [
        ("alice", "owner"), ("bob", "editor"), ("carol", "viewer"),
    ]
    assert all(set(m) == {"user", "role"} and set(m["user"]) == {"id", "username"} for m in body)


def test_outsider_cannot_list_members(shared_session: Any, charlie: Any, api: Any) -> None:
    assert_error(api(charlie).get(members_url(shared_session)), 404, "not_found")


# ---------------------------------------------------------------- add


def test_owner_adds_a_member(shared_session: Any, alice: Any, charlie: Any, api: Any) -> None:
    response = api(alice).post(members_url(shared_session), {"username": "charlie", "role": "viewer"}, format="json")
    assert response.status_code == 201
    assert response.json() == {"user": {"id": charlie.pk, "username": "charlie"}, "role": "viewer"}
    assert roles(shared_session)["charlie"] == "viewer"
    last = Event.objects.filter(session=shared_session).order_by("-seq").first()
    assert last is not None and last.type == "member.added"
    # ...and the new member now sees the session.
    assert api(charlie).get(f"/api/sessions/{shared_session.id}/").json()["role"] == "viewer"


def test_owner_adds_an_editor(shared_session: Any, alice: Any, charlie: Any, api: Any) -> None:
    response = api(alice).post(members_url(shared_session), {"username": "charlie", "role": "editor"}, format="json")
    assert response.status_code == 201 and response.json()["role"] == "editor"


@pytest.mark.parametrize(
    "who, status, code",
    [("bob", 403, "permission_denied"), ("carol", 403, "permission_denied"), ("charlie", 404, "not_found")],
)
def test_only_the_owner_adds_members(
    shared_session: Any, api: Any, request: Any, who: str, status: int, code: str
) -> None:
    make_user("dave")
    response = api(request.getfixturevalue(who)).post(
        members_url(shared_session), {"username": "dave", "role": "viewer"}, format="json"
    )
    assert_error(response, status, code)
    assert "dave" not in roles(shared_session)


def test_adding_an_unknown_user_is_400(shared_session: Any, alice: Any, api: Any) -> None:
    response = api(alice).post(members_url(shared_session), {"username": "nobody", "role": "viewer"}, format="json")
    error = assert_error(response, 400, "validation_error")
    assert "username" in error["details"]


def test_adding_an_inactive_user_is_400(shared_session: Any, alice: Any, charlie: Any, api: Any) -> None:
    charlie.is_active = False
    charlie.save()
    response = api(alice).post(members_url(shared_session), {"username": "charlie", "role": "viewer"}, format="json")
    assert_error(response, 400, "validation_error")


def test_adding_an_existing_member_is_409(shared_session: Any, alice: Any, api: Any) -> None:
    before = shared_session.last_seq
    response = api(alice).post(members_url(shared_session), {"username": "bob", "role": "viewer"}, format="json")
    assert_error(response, 409, "conflict")
    assert roles(shared_session)["bob"] == "editor"  # unchanged
    shared_session.refresh_from_db()
    assert shared_session.last_seq == before


def test_owner_adding_themselves_is_409(shared_session: Any, alice: Any, api: Any) -> None:
    response = api(alice).post(members_url(shared_session), {"username": "alice", "role": "viewer"}, format="json")
    assert_error(response, 409, "conflict")
    assert roles(shared_session)["alice"] == "owner"


@pytest.mark.parametrize(
    "body, field",
    [
        ({"username": "charlie", "role": "owner"}, "role"),
        ({"username": "charlie", "role": "admin"}, "role"),
        ({"username": "charlie"}, "role"),
        ({"role": "viewer"}, "username"),
        ({"username": "charlie", "role": None}, "role"),
        ({"username": 5, "role": "viewer"}, "username"),
        ({"username": "charlie", "role": "viewer", "admin": True}, "admin"),
    ],
)
def test_adding_with_bad_fields_is_400(
    shared_session: Any, alice: Any, charlie: Any, api: Any, body: Any, field: str
) -> None:
    error = assert_error(api(alice).post(members_url(shared_session), body, format="json"), 400, "validation_error")
    assert field in error["details"]
    assert "charlie" not in roles(shared_session)


# ---------------------------------------------------------------- remove


def test_owner_removes_a_member(shared_session: Any, alice: Any, bob: Any, api: Any) -> None:
    response = api(alice).delete(members_url(shared_session, "bob"))
    assert response.status_code == 204
    assert "bob" not in roles(shared_session)
    last = Event.objects.filter(session=shared_session).order_by("-seq").first()
    assert last is not None and last.type == "member.removed"


def test_removed_member_then_gets_404_everywhere(shared_session: Any, alice: Any, bob: Any, api: Any) -> None:
    assert api(alice).delete(members_url(shared_session, "bob")).status_code == 204
    client = api(bob)
    assert_error(client.get(f"/api/sessions/{shared_session.id}/"), 404, "not_found")
    assert_error(client.get(f"/api/sessions/{shared_session.id}/messages/"), 404, "not_found")
    assert_error(client.get(f"/api/sessions/{shared_session.id}/events/"), 404, "not_found")
    assert_error(
        client.post(f"/api/sessions/{shared_session.id}/messages/", {"parts": [{"type": "text", "text": "hi"}]}, format="json"),
        404, "not_found",
    )
    assert client.get("/api/sessions/").json()["results"] == []


def test_owner_cannot_be_removed(shared_session: Any, alice: Any, api: Any) -> None:
    assert_error(api(alice).delete(members_url(shared_session, "alice")), 400, "bad_request")
    assert roles(shared_session)["alice"] == "owner"


def test_removing_a_non_member_is_404(shared_session: Any, alice: Any, charlie: Any, api: Any) -> None:
    assert_error(api(alice).delete(members_url(shared_session, "charlie")), 404, "not_found")
    assert_error(api(alice).delete(members_url(shared_session, "nobody")), 404, "not_found")


def test_removing_twice_is_404(shared_session: Any, alice: Any, api: Any) -> None:
    assert api(alice).delete(members_url(shared_session, "carol")).status_code == 204
    assert_error(api(alice).delete(members_url(shared_session, "carol")), 404, "not_found")


@pytest.mark.parametrize(
    "who, status, code",
    [("bob", 403, "permission_denied"), ("carol", 403, "permission_denied"), ("charlie", 404, "not_found")],
)
def test_only_the_owner_removes_members(
    shared_session: Any, api: Any, request: Any, who: str, status: int, code: str
) -> None:
    assert_error(api(request.getfixturevalue(who)).delete(members_url(shared_session, "carol")), status, code)
    assert roles(shared_session)["carol"] == "viewer"


def test_editor_cannot_remove_themselves(shared_session: Any, bob: Any, api: Any) -> None:
    assert_error(api(bob).delete(members_url(shared_session, "bob")), 403, "permission_denied")
    assert roles(shared_session)["bob"] == "editor"


def test_removed_member_can_be_added_again(shared_session: Any, alice: Any, bob: Any, api: Any) -> None:
    client = api(alice)
    assert client.delete(members_url(shared_session, "bob")).status_code == 204
    response = client.post(members_url(shared_session), {"username": "bob", "role": "viewer"}, format="json")
    assert response.status_code == 201
    assert api(bob).get(f"/api/sessions/{shared_session.id}/").json()["role"] == "viewer"
