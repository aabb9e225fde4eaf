"""The ``tools`` agent and the human-in-the-loop permission flow (PROTOCOL §3, §7):
the request appears for every member, the first answer wins, the tool runs and its
status streams, and rejection, expiry and abort all end cleanly."""
from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from sessions_app import services
from sessions_app.models import Message, Part, PermissionRequest, ReplyRun, Session
from tests.conftest import client_for
from tests.helpers import assert_error
from tests.replies import head, log_after, post, wait_for_completed, wait_for_event, wait_idle

pytestmark = [pytest.mark.django_db(transaction=True)]


@pytest.fixture
def tools_session(shared_session: Session) -> Session:
    Session.objects.filter(pk=shared_session.pk).update(agent="tools")
    shared_session.refresh_from_db()
    return shared_session


def ask(user: Any, session: Session, text: str) -> tuple[int, str, dict[str, Any]]:
    """Post ``text``; return the head before it, the reply id and the request event."""
    before = head(session.id)
    response = post(user, session.id, text)
    assert response.status_code == 202, response.content
    requested = wait_for_event(session.id, before, "permission.requested")
    return before, response.json()["reply_id"], requested["properties"]["permission"]


def answer(user: Any, session: Session, permission_id: str, **body: Any) -> Any:
    return client_for(user).post(
        f"/api/sessions/{session.id}/permissions/{permission_id}/", body, format="json"
    )


def reply_text(reply_id: str) -> str:
    return "".join(
        Part.objects.filter(message_id=reply_id, type=Part.PartType.TEXT).values_list("text", flat=True)
    )


def tool_statuses(events: list[dict[str, Any]]) -> list[str]:
    return [e["properties"]["status"] for e in events if e["type"] == "tool.status"]


# ---------------------------------------------------------------- the happy path


def test_approved_calculation_runs_and_answers(tools_session: Session, bob: Any, alice: Any) -> None:
    before, reply_id, permission = ask(bob, tools_session, "!calc 2*(3+4)")
    assert permission["tool"] == "calculator"
    assert permission["input"] == {"expression": "2*(3+4)"}
    assert permission["status"] == "pending" and permission["resolved_by"] is None
    assert permission["message_id"] == reply_id

    response = answer(alice, tools_session, permission["id"], approved=True)
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["status"] == "approved" and body["approved"] is True
    assert body["resolved_by"] == {"id": alice.pk, "username": "alice"}

    completed = wait_for_completed(tools_session.id, before, reply_id)
    assert completed["properties"]["status"] == "completed"
    wait_idle(tools_session.id)
    assert reply_text(reply_id) == "2*(3+4) = 14"

    events = log_after(tools_session.id, before)
    assert tool_statuses(events) == ["pending", "running", "completed"]
    done = [e for e in events if e["type"] == "tool.status"][-1]["properties"]
    assert done["output"] == 14 and done["tool"] == "calculator"
    assert done["call_id"] == permission["call_id"]
    resolved = next(e for e in events if e["type"] == "permission.resolved")["properties"]
    assert resolved == {
        "permission_id": permission["id"], "approved": True, "reason": None,
        "resolved_by": {"id": alice.pk, "username": "alice"},
    }
    types = [e["type"] for e in events]
    # The request comes before the answer, the answer before the tool runs.
    assert types.index("permission.requested") < types.index("permission.resolved")
    assert types.index("permission.resolved") < types.index("message.completed")
    tool_part = Part.objects.get(message_id=reply_id, type=Part.PartType.TOOL)
    assert tool_part.state == {"status": "completed", "input": {"expression": "2*(3+4)"}, "output": 14}
    assert tool_part.index == 0
    assert not ReplyRun.objects.filter(pk=reply_id).exists()


def test_float_results_and_true_division(tools_session: Session, bob: Any) -> None:
    before, reply_id, permission = ask(bob, tools_session, "!calc 7/2")
    assert answer(bob, tools_session, permission["id"], approved=True).status_code == 200
    wait_for_completed(tools_session.id, before, reply_id)
    assert reply_text(reply_id) == "7/2 = 3.5"


def test_time_needs_no_permission(tools_session: Session, bob: Any) -> None:
    before = head(tools_session.id)
    reply_id = post(bob, tools_session.id, "!time").json()["reply_id"]
    wait_for_completed(tools_session.id, before, reply_id)
    events = log_after(tools_session.id, before)
    assert not [e for e in events if e["type"].startswith("permission.")]
    assert tool_statuses(events) == ["pending", "running", "completed"]
    assert reply_text(reply_id).startswith("The server time is 20")


def test_anything_else_is_echoed(tools_session: Session, bob: Any) -> None:
    before = head(tools_session.id)
    reply_id = post(bob, tools_session.id, "just  talk").json()["reply_id"]
    wait_for_completed(tools_session.id, before, reply_id)
    assert reply_text(reply_id) == "just  talk"


# ---------------------------------------------------------------- the other endings


def test_rejected_request_is_not_run(tools_session: Session, bob: Any) -> None:
    before, reply_id, permission = ask(bob, tools_session, "!calc 1+1")
    response = answer(bob, tools_session, permission["id"], approved=False, reason="not now")
    assert response.json()["status"] == "rejected" and response.json()["reason"] == "not now"
    wait_for_completed(tools_session.id, before, reply_id)
    events = log_after(tools_session.id, before)
    assert tool_statuses(events) == ["pending", "error"]
    error = [e for e in events if e["type"] == "tool.status"][-1]["properties"]["error"]
    assert "rejected" in error and "not now" in error
    assert "did not run" in reply_text(reply_id)
    assert Message.objects.get(pk=reply_id).status == "completed"


def test_unanswered_request_expires_as_rejected(tools_session: Session, bob: Any, settings: Any) -> None:
    settings.TANDEM_PERMISSION_TIMEOUT = 0.3
    before, reply_id, permission = ask(bob, tools_session, "!calc 1+1")
    wait_for_completed(tools_session.id, before, reply_id)
    stored = PermissionRequest.objects.get(pk=permission["id"])
    assert stored.status == "expired" and stored.approved is False
    resolved = wait_for_event(tools_session.id, before, "permission.resolved")["properties"]
    assert resolved["resolved_by"] == "timeout" and resolved["approved"] is False
    assert tool_statuses(log_after(tools_session.id, before)) == ["pending", "error"]
    assert "did not run" in reply_text(reply_id)
    late = answer(bob, tools_session, permission["id"], approved=True)
    assert_error(late, 409, "already_resolved")


def test_tool_error_is_reported_not_raised(tools_session: Session, bob: Any) -> None:
    before, reply_id, permission = ask(bob, tools_session, "!calc 1/0")
    answer(bob, tools_session, permission["id"], approved=True)
    wait_for_completed(tools_session.id, before, reply_id)
    events = log_after(tools_session.id, before)
    assert tool_statuses(events) == ["pending", "running", "error"]
    assert "could not calculate 1/0" in reply_text(reply_id)
    wait_idle(tools_session.id)
    # The session stays usable.
    again = post(bob, tools_session.id, "still here")
    assert again.status_code == 202


@pytest.mark.parametrize("expression", ["9**9**9**9", "(" * 5000 + "1" + ")" * 5000, "__import__('os')"])
def test_hostile_expressions_give_a_tool_error(tools_session: Session, bob: Any, expression: str) -> None:
    before, reply_id, permission = ask(bob, tools_session, f"!calc {expression}")
    answer(bob, tools_session, permission["id"], approved=True)
    wait_for_completed(tools_session.id, before, reply_id)
    assert tool_statuses(log_after(tools_session.id, before))[-1] == "error"


def test_abort_while_waiting_rejects_the_request_and_cancels(tools_session: Session, bob: Any, alice: Any) -> None:
    before, reply_id, permission = ask(bob, tools_session, "!calc 2+2")
    aborted_at = time.monotonic()
    response = client_for(alice).post(f"/api/sessions/{tools_session.id}/abort/", {}, format="json")
    assert response.json() == {"aborted": True}
    completed = wait_for_completed(tools_session.id, before, reply_id, timeout=1.0)
    assert time.monotonic() - aborted_at < 1.0
    assert completed["properties"]["status"] == "cancelled"
    wait_idle(tools_session.id, timeout=1.0)
    stored = PermissionRequest.objects.get(pk=permission["id"])
    assert stored.status == "rejected" and stored.resolved_by_id == alice.pk
    events = log_after(tools_session.id, before)
    assert tool_statuses(events) == ["pending", "error"]
    types = [e["type"] for e in events]
    assert types.index("permission.resolved") < types.index("message.completed")
    assert_error(answer(bob, tools_session, permission["id"], approved=True), 409, "already_resolved")


# ---------------------------------------------------------------- first answer wins


def test_concurrent_answers_exactly_one_wins(tools_session: Session, alice: Any, bob: Any) -> None:
    # Several threads, each on its own database connection, answer the same request at
    # the same moment; the database lets exactly one change it.
    before, reply_id, permission = ask(bob, tools_session, "!calc 3*3")
    answerers = [(alice, True), (bob, False), (alice, False), (bob, True)]
    barrier = threading.Barrier(len(answerers))
    results: list[tuple[int, Any]] = []
    lock = threading.Lock()

    def respond(user: Any, approved: bool) -> None:
        from django.db import connection

        try:
            barrier.wait(timeout=10)
            response = answer(user, tools_session, permission["id"], approved=approved)
            with lock:
                results.append((response.status_code, response.json()))
        finally:
            connection.close()

    threads = [threading.Thread(target=respond, args=a) for a in answerers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    codes = sorted(code for code, _ in results)
    assert codes == [200, 409, 409, 409], results
    winner = next(body for code, body in results if code == 200)
    for code, body in results:
        if code == 409:
            assert body["error"]["code"] == "already_resolved"
    wait_for_completed(tools_session.id, before, reply_id)
    resolutions = [e for e in log_after(tools_session.id, before) if e["type"] == "permission.resolved"]
    assert len(resolutions) == 1
    assert resolutions[0]["properties"]["approved"] is winner["approved"]
    stored = PermissionRequest.objects.get(pk=permission["id"])
    assert stored.approved is winner["approved"]


# ---------------------------------------------------------------- reading requests


def test_late_joiner_sees_pending_requests(tools_session: Session, bob: Any, carol: Any, settings: Any) -> None:
    before, reply_id, permission = ask(bob, tools_session, "!calc 5-1")
    viewer = client_for(carol)
    pending = viewer.get(f"/api/sessions/{tools_session.id}/permissions/?status=pending").json()
    assert [p["id"] for p in pending] == [permission["id"]]
    assert pending[0] == permission
    assert viewer.get(f"/api/sessions/{tools_session.id}/permissions/?status=approved").json() == []
    answer(bob, tools_session, permission["id"], approved=True)
    wait_for_completed(tools_session.id, before, reply_id)
    every = viewer.get(f"/api/sessions/{tools_session.id}/permissions/").json()
    assert [(p["id"], p["status"]) for p in every] == [(permission["id"], "approved")]


# ---------------------------------------------------------------- bad input


@pytest.fixture
def pending(tools_session: Session, bob: Any) -> tuple[Session, dict[str, Any]]:
    _, _, permission = ask(bob, tools_session, "!calc 1+2")
    return tools_session, permission


@pytest.mark.parametrize(
    "body, field",
    [
        ({"approved": "yes"}, "approved"),
        ({"approved": 1}, "approved"),
        ({"approved": None}, "approved"),
        ({}, "approved"),
        ({"approved": True, "reason": 5}, "reason"),
        ({"approved": True, "reason": "x" * 2001}, "reason"),
        ({"approved": True, "by": "me"}, "by"),
    ],
)
def test_bad_answers_are_refused_and_the_request_stays_pending(
    pending: tuple[Session, dict[str, Any]], bob: Any, body: dict[str, Any], field: str
) -> None:
    session, permission = pending
    error = assert_error(answer(bob, session, permission["id"], **body), 400, "validation_error")
    assert field in error["details"]
    assert PermissionRequest.objects.get(pk=permission["id"]).status == "pending"
    services.abort(session)


def test_answers_to_unknown_foreign_or_forbidden_requests(
    pending: tuple[Session, dict[str, Any]], alice: Any, bob: Any, carol: Any, charlie: Any
) -> None:
    session, permission = pending
    assert_error(answer(bob, session, "per_doesnotexist", approved=True), 404, "not_found")
    other = services.create_session(alice, title="Other", agent="tools")
    services.add_member(other, username="bob", role="editor")
    # A real request id, but of another session: not found here.
    assert_error(answer(bob, other, permission["id"], approved=True), 404, "not_found")
    assert_error(answer(carol, session, permission["id"], approved=True), 403, "permission_denied")
    assert_error(answer(charlie, session, permission["id"], approved=True), 404, "not_found")
    assert_error(
        client_for(charlie).get(f"/api/sessions/{session.id}/permissions/"), 404, "not_found"
    )
    assert PermissionRequest.objects.get(pk=permission["id"]).status == "pending"
    services.abort(session)


@pytest.mark.parametrize("query", ["status=bogus", "state=pending", "status="])
def test_bad_list_queries(tools_session: Session, bob: Any, query: str) -> None:
    response = client_for(bob).get(f"/api/sessions/{tools_session.id}/permissions/?{query}")
    assert_error(response, 400, "validation_error")
