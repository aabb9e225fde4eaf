"""§3 Session resource: list, create, read, rename, delete, and who may do which."""
from __future__ import annotations

from typing import Any

import pytest

from events_app.models import Event
from sessions_app import services
from sessions_app.models import Membership, Message, Session
from tests.helpers import assert_error

pytestmark = pytest.mark.django_db

SESSION_KEYS = {
    "id", "title", "agent", "status", "owner", "role", "last_seq", "created_at", "updated_at", "forked_from",
}


def url(session: Any) -> str:
    return f"/api/sessions/{session.id}/"


# ---------------------------------------------------------------- list


def test_list_shows_only_the_callers_sessions(shared_session: Any, alice: Any, charlie: Any, api: Any) -> None:
    own = services.create_session(charlie, title="charlie's", agent="echo")
    body = api(charlie).get("/api/sessions/").json()
    assert body["next"] is None
    assert [s["id"] for s in body["results"]] == [own.id]
    assert body["results"][0]["role"] == "owner"
    alice_ids = [s["id"] for s in api(alice).get("/api/sessions/").json()["results"]]
    assert alice_ids == [shared_session.id]


def test_list_has_results_and_next_and_full_session_shape(shared_session: Any, carol: Any, api: Any) -> None:
    response = api(carol).get("/api/sessions/")
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"results", "next"}
    (item,) = body["results"]
    assert set(item) == SESSION_KEYS
    assert item["role"] == "viewer"
    assert item["owner"] == {"id": shared_session.owner_id, "username": "alice"}
    assert item["status"] == {"type": "idle"}
    assert item["created_at"].endswith("Z") and item["updated_at"].endswith("Z")


def test_list_shows_each_members_own_role(shared_session: Any, bob: Any, carol: Any, api: Any) -> None:
    assert api(bob).get("/api/sessions/").json()["results"][0]["role"] == "editor"
    assert api(carol).get("/api/sessions/").json()["results"][0]["role"] == "viewer"


def test_list_is_newest_activity_first(alice: Any, api: Any) -> None:
    first = services.create_session(alice, title="first", agent="echo")
    second = services.create_session(alice, title="second", agent="echo")
    third = services.create_session(alice, title="third", agent="echo")
    titles = [s["title"] for s in api(alice).get("/api/sessions/").json()["results"]]
    assert titles == ["third", "second", "first"]
    # Activity in the oldest session moves it to the top.
    response = api(alice).post(f"/api/sessions/{first.id}/events/", {"type": "task.progress"}, format="json")
    assert response.status_code == 201
    ids = [s["id"] for s in api(alice).get("/api/sessions/").json()["results"]]
    assert ids == [first.id, third.id, second.id]


def test_list_paginates_with_a_next_link(alice: Any, api: Any) -> None:
    made = [services.create_session(alice, title=f"s{i}", agent="echo").id for i in range(5)]
    client = api(alice)
    page = client.get("/api/sessions/?limit=2").json()
    seen = [s["id"] for s in page["results"]]
    assert len(seen) == 2 and page["next"]
    while page["next"]:
        page = client.get(page["next"]).json()
        seen += [s["id"] for s in page["results"]]
    assert seen == list(reversed(made))


@pytest.mark.parametrize("cursor", ["not-a-cursor", "cD0yMDI0", "x" * 500])
def test_list_with_a_garbage_cursor_is_a_bad_request(alice: Any, api: Any, cursor: str) -> None:
    error = assert_error(api(alice).get(f"/api/sessions/?cursor={cursor}"), 400, "bad_request")
    assert "cursor" in error["details"]


# ---------------------------------------------------------------- create


def test_create_makes_the_caller_owner(alice: Any, api: Any) -> None:
    response = api(alice).post("/api/sessions/", {"title": "Fix it", "agent": "echo"}, format="json")
    assert response.status_code == 201
    body = response.json()
    assert set(body) == SESSION_KEYS
    assert body["title"] == "Fix it" and body["agent"] == "echo" and body["role"] == "owner"
    assert body["owner"] == {"id": alice.pk, "username": "alice"}
    membership = Membership.objects.get(session_id=body["id"])
    assert (membership.user_id, membership.role) == (alice.pk, "owner")
    assert Event.objects.filter(session_id=body["id"], type="session.created").count() == 1


def test_create_with_an_empty_body_uses_defaults(alice: Any, api: Any) -> None:
    response = api(alice).post("/api/sessions/", {}, format="json")
    assert response.status_code == 201
    assert response.json()["title"] == "" and response.json()["agent"] == "echo"


def test_create_with_no_body_at_all_uses_defaults(alice: Any, api: Any) -> None:
    response = api(alice).post("/api/sessions/")
    assert response.status_code == 201, response.content


def test_create_with_an_unknown_agent_is_400(alice: Any, api: Any) -> None:
    response = api(alice).post("/api/sessions/", {"agent": "skynet"}, format="json")
    error = assert_error(response, 400, "validation_error")
    assert "agent" in error["details"]
    assert Session.objects.count() == 0


@pytest.mark.parametrize(
    "body, field",
    [
        ({"title": "x" * 201}, "title"),
        ({"title": None}, "title"),
        ({"title": 42}, "title"),
        ({"title": ["a"]}, "title"),
        ({"title": {"a": 1}}, "title"),
        ({"agent": None}, "agent"),
        ({"agent": ""}, "agent"),
        ({"title": "ok", "owner": 2}, "owner"),
        ({"id": "ses_mine"}, "id"),
    ],
)
def test_create_with_bad_fields_is_400_naming_the_field(alice: Any, api: Any, body: Any, field: str) -> None:
    error = assert_error(api(alice).post("/api/sessions/", body, format="json"), 400, "validation_error")
    assert field in error["details"]
    assert Session.objects.count() == 0


def test_create_needs_authentication(db: None) -> None:
    from rest_framework.test import APIClient

    assert_error(APIClient().post("/api/sessions/", {}, format="json"), 401, "not_authenticated")
    assert Session.objects.count() == 0


# ---------------------------------------------------------------- get


@pytest.mark.parametrize("who, role", [("alice", "owner"), ("bob", "editor"), ("carol", "viewer")])
def test_every_member_reads_the_session_with_their_role(
    shared_session: Any, api: Any, request: Any, who: str, role: str
) -> None:
    response = api(request.getfixturevalue(who)).get(url(shared_session))
    assert response.status_code == 200
    body = response.json()
    assert body["id"] == shared_session.id and body["role"] == role
    assert body["last_seq"] == shared_session.last_seq == 3  # created + two member.added


def test_outsider_cannot_see_the_session(shared_session: Any, charlie: Any, api: Any) -> None:
    assert_error(api(charlie).get(url(shared_session)), 404, "not_found")


def test_unknown_session_is_404_like_a_hidden_one(alice: Any, api: Any) -> None:
    hidden = assert_error(api(alice).get("/api/sessions/ses_00000000000000000000/"), 404, "not_found")
    assert hidden["message"]


# ---------------------------------------------------------------- patch


def test_owner_renames_the_session(shared_session: Any, alice: Any, api: Any) -> None:
    response = api(alice).patch(url(shared_session), {"title": "Renamed"}, format="json")
    assert response.status_code == 200
    body = response.json()
    assert body["title"] == "Renamed" and body["role"] == "owner"
    assert body["last_seq"] == shared_session.last_seq + 1
    shared_session.refresh_from_db()
    assert shared_session.title == "Renamed"
    event = Event.objects.get(session=shared_session, seq=shared_session.last_seq)
    assert event.type == "session.updated"


def test_owner_can_clear_the_title(shared_session: Any, alice: Any, api: Any) -> None:
    assert api(alice).patch(url(shared_session), {"title": ""}, format="json").json()["title"] == ""


def test_editor_cannot_rename(shared_session: Any, bob: Any, api: Any) -> None:
    assert_error(api(bob).patch(url(shared_session), {"title": "Mine"}, format="json"), 403, "permission_denied")
    shared_session.refresh_from_db()
    assert shared_session.title == "Fix the login bug"


def test_viewer_cannot_rename(shared_session: Any, carol: Any, api: Any) -> None:
    assert_error(api(carol).patch(url(shared_session), {"title": "Mine"}, format="json"), 403, "permission_denied")


def test_outsider_cannot_rename(shared_session: Any, charlie: Any, api: Any) -> None:
    assert_error(api(charlie).patch(url(shared_session), {"title": "Mine"}, format="json"), 404, "not_found")
    shared_session.refresh_from_db()
    assert shared_session.title == "Fix the login bug"


@pytest.mark.parametrize(
    "body, field",
    [({}, "title"), ({"title": None}, "title"), ({"title": 7}, "title"), ({"title": "x" * 201}, "title"),
     ({"title": "ok", "agent": "tools"}, "agent"), ({"status": {"type": "busy"}}, "status")],
)
def test_rename_with_bad_fields_changes_nothing(
    shared_session: Any, alice: Any, api: Any, body: Any, field: str
) -> None:
    error = assert_error(api(alice).patch(url(shared_session), body, format="json"), 400, "validation_error")
    assert field in error["details"]
    before = shared_session.last_seq
    shared_session.refresh_from_db()
    assert shared_session.title == "Fix the login bug" and shared_session.agent == "echo"
    assert shared_session.status == {"type": "idle"} and shared_session.last_seq == before


def test_put_is_not_allowed(shared_session: Any, alice: Any, api: Any) -> None:
    assert_error(api(alice).put(url(shared_session), {"title": "x"}, format="json"), 405, "method_not_allowed")


# ---------------------------------------------------------------- delete


def test_owner_deletes_the_session_and_everything_in_it(shared_session: Any, alice: Any, bob: Any, api: Any) -> None:
    session_id = shared_session.id
    response = api(alice).delete(url(shared_session))
    assert response.status_code == 204
    assert response.content == b""
    assert_error(api(alice).get(url(shared_session)), 404, "not_found")
    assert_error(api(bob).get(url(shared_session)), 404, "not_found")
    assert not Session.objects.filter(pk=session_id).exists()
    assert not Membership.objects.filter(session_id=session_id).exists()
    assert not Event.objects.filter(session_id=session_id).exists()
    assert not Message.objects.filter(session_id=session_id).exists()
    assert api(bob).get("/api/sessions/").json()["results"] == []


def test_deleting_twice_is_404(shared_session: Any, alice: Any, api: Any) -> None:
    assert api(alice).delete(url(shared_session)).status_code == 204
    assert_error(api(alice).delete(url(shared_session)), 404, "not_found")


@pytest.mark.parametrize(
    "who, status, code",
    [("bob", 403, "permission_denied"), ("carol", 403, "permission_denied"), ("charlie", 404, "not_found")],
)
def test_only_the_owner_deletes(
    shared_session: Any, api: Any, request: Any, who: str, status: int, code: str
) -> None:
    assert_error(api(request.getfixturevalue(who)).delete(url(shared_session)), status, code)
    assert Session.objects.filter(pk=shared_session.id).exists()


# ---------------------------------------------------------------- health and presence


def test_viewer_reads_session_health(shared_session: Any, carol: Any, api: Any) -> None:
    response = api(carol).get(f"/api/sessions/{shared_session.id}/health/")
    assert response.status_code == 200
    body = response.json()
    assert body == {"status": {"type": "idle"}, "last_seq": 3, "connections": 0, "run": None}


def test_health_shows_the_running_reply(shared_session: Any, bob: Any, api: Any) -> None:
    posted = api(bob).post(
        f"/api/sessions/{shared_session.id}/messages/", {"parts": [{"type": "text", "text": "hi"}]}, format="json"
    ).json()
    body = api(bob).get(f"/api/sessions/{shared_session.id}/health/").json()
    assert body["status"] == {"type": "busy"}
    run = body["run"]
    assert run["message_id"] == posted["reply_id"] and run["queued_at"].endswith("Z")
    # Queued until a runner takes it; only then does it have a start.
    assert (run["state"], run["started_at"] is None) in (("queued", True), ("running", False))


def test_presence_is_a_plain_array(shared_session: Any, carol: Any, api: Any) -> None:
    response = api(carol).get(f"/api/sessions/{shared_session.id}/presence/")
    assert response.status_code == 200
    assert response.json() == []
