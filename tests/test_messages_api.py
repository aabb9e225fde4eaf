"""§3 messages: posting starts the agent's reply, listing shows the conversation, and
every way a post can be refused leaves the stored conversation as it was."""
from __future__ import annotations

from typing import Any

import pytest

from sessions_app.models import Message, Part, Session
from tests.conftest import wait_until
from tests.helpers import assert_error

MESSAGE_KEYS = {"id", "session_id", "role", "author", "status", "created_at", "completed_at", "parts"}


def messages_url(session: Any) -> str:
    return f"/api/sessions/{session.id}/messages/"


def text(*texts: str, **extra: Any) -> dict[str, Any]:
    return {"parts": [{"type": "text", "text": t} for t in texts], **extra}


def make_busy(session: Any) -> None:
    Session.objects.filter(pk=session.pk).update(status={"type": "busy"})


def reply_done(reply_id: str) -> Message | None:
    message = Message.objects.get(pk=reply_id)
    return message if message.status != Message.Status.STREAMING else None


def reply_text(reply_id: str) -> str:
    return "".join(Part.objects.filter(message_id=reply_id).order_by("index").values_list("text", flat=True))


# ---------------------------------------------------------------- posting (no agent run: plain db)


@pytest.mark.django_db
def test_post_returns_202_with_the_stored_message_and_a_reply_id(shared_session: Any, bob: Any, api: Any) -> None:
    response = api(bob).post(messages_url(shared_session), text("Hello"), format="json")
    assert response.status_code == 202, response.content
    body = response.json()
    assert set(body) == {"message", "reply_id"}
    message = body["message"]
    assert set(message) == MESSAGE_KEYS
    assert message["role"] == "user" and message["status"] == "completed"
    assert message["author"] == {"id": bob.pk, "username": "bob"}
    assert message["session_id"] == shared_session.id
    assert [(p["type"], p["text"]) for p in message["parts"]] == [("text", "Hello")]
    assert all(p["id"] for p in message["parts"])
    reply = Message.objects.get(pk=body["reply_id"])
    assert reply.role == "assistant" and reply.session_id == shared_session.id
    shared_session.refresh_from_db()
    assert shared_session.status == {"type": "busy"}


@pytest.mark.django_db
def test_owner_can_post(shared_session: Any, alice: Any, api: Any) -> None:
    assert api(alice).post(messages_url(shared_session), text("hi"), format="json").status_code == 202


@pytest.mark.django_db
def test_viewer_cannot_post(shared_session: Any, carol: Any, api: Any) -> None:
    assert_error(api(carol).post(messages_url(shared_session), text("hi"), format="json"), 403, "permission_denied")
    assert Message.objects.count() == 0
    shared_session.refresh_from_db()
    assert shared_session.status == {"type": "idle"}


@pytest.mark.django_db
def test_outsider_cannot_post(shared_session: Any, charlie: Any, api: Any) -> None:
    assert_error(api(charlie).post(messages_url(shared_session), text("hi"), format="json"), 404, "not_found")
    assert Message.objects.count() == 0


@pytest.mark.django_db
def test_outsider_cannot_list_messages(shared_session: Any, charlie: Any, api: Any) -> None:
    assert_error(api(charlie).get(messages_url(shared_session)), 404, "not_found")


@pytest.mark.django_db
def test_posting_while_busy_with_if_busy_reject_is_409_session_busy(shared_session: Any, bob: Any, api: Any) -> None:
    make_busy(shared_session)
    before = shared_session.last_seq
    response = api(bob).post(messages_url(shared_session), text("again", if_busy="reject"), format="json")
    assert_error(response, 409, "session_busy")
    assert Message.objects.count() == 0
    shared_session.refresh_from_db()
    assert shared_session.last_seq == before and shared_session.status == {"type": "busy"}


@pytest.mark.django_db
def test_posting_while_retrying_with_if_busy_reject_is_409_session_busy(shared_session: Any, bob: Any, api: Any) -> None:
    Session.objects.filter(pk=shared_session.pk).update(
        status={"type": "retry", "attempt": 1, "message": "x", "next_at": "2030-01-01T00:00:00Z"}
    )
    response = api(bob).post(messages_url(shared_session), text("again", if_busy="reject"), format="json")
    assert_error(response, 409, "session_busy")


@pytest.mark.django_db
def test_second_post_before_the_reply_runs_is_busy(shared_session: Any, bob: Any, alice: Any, api: Any) -> None:
    # Under the plain db fixture on_commit never fires, so the first reply never runs.
    assert api(bob).post(messages_url(shared_session), text("one"), format="json").status_code == 202
    response = api(alice).post(messages_url(shared_session), text("two", if_busy="reject"), format="json")
    assert_error(response, 409, "session_busy")
    assert Message.objects.filter(role="user").count() == 1


@pytest.mark.django_db
def test_message_over_the_character_limit_is_413(shared_session: Any, bob: Any, api: Any, settings: Any) -> None:
    settings.TANDEM_MAX_MESSAGE_CHARS = 10
    response = api(bob).post(messages_url(shared_session), text("x" * 11), format="json")
    assert_error(response, 413, "payload_too_large")
    assert Message.objects.count() == 0
    shared_session.refresh_from_db()
    assert shared_session.status == {"type": "idle"}


@pytest.mark.django_db
def test_message_exactly_at_the_character_limit_is_accepted(shared_session: Any, bob: Any, api: Any, settings: Any) -> None:
    settings.TANDEM_MAX_MESSAGE_CHARS = 10
    assert api(bob).post(messages_url(shared_session), text("x" * 10), format="json").status_code == 202


@pytest.mark.django_db
def test_character_limit_counts_all_text_parts_together(shared_session: Any, bob: Any, api: Any, settings: Any) -> None:
    settings.TANDEM_MAX_MESSAGE_CHARS = 10
    assert_error(api(bob).post(messages_url(shared_session), text("x" * 6, "y" * 5), format="json"), 413, "payload_too_large")
    assert Message.objects.count() == 0


@pytest.mark.django_db
@pytest.mark.parametrize("payload", ["\u00e9" * 5, "\U0001f600" * 5, "\u4e2d\u6587\u5b57\u7b26\u4e32"])
def test_character_limit_counts_code_points_not_bytes(
    shared_session: Any, bob: Any, api: Any, settings: Any, payload: str
) -> None:
    settings.TANDEM_MAX_MESSAGE_CHARS = 5
    response = api(bob).post(messages_url(shared_session), text(payload), format="json")
    assert response.status_code == 202, response.content
    assert response.json()["message"]["parts"][0]["text"] == payload


@pytest.mark.django_db
def test_six_emoji_are_over_a_five_character_limit(shared_session: Any, bob: Any, api: Any, settings: Any) -> None:
    settings.TANDEM_MAX_MESSAGE_CHARS = 5
    assert_error(api(bob).post(messages_url(shared_session), text("\U0001f600" * 6), format="json"), 413, "payload_too_large")


@pytest.mark.django_db
@pytest.mark.parametrize(
    "body, field",
    [
        ({}, "parts"),
        ({"parts": []}, "parts"),
        ({"parts": None}, "parts"),
        ({"parts": "hello"}, "parts"),
        ({"parts": {"type": "text", "text": "hi"}}, "parts"),
        ({"parts": ["hello"]}, "parts"),
        ({"parts": [{"type": "text"}]}, "parts"),
        ({"parts": [{"type": "text", "text": ""}]}, "parts"),
        ({"parts": [{"type": "text", "text": None}]}, "parts"),
        ({"parts": [{"type": "text", "text": 5}]}, "parts"),
        ({"parts": [{"type": "text", "text": ["a"]}]}, "parts"),
        ({"parts": [{"type": "image", "text": "hi"}]}, "parts"),
        ({"parts": [{"type": "tool", "text": "hi"}]}, "parts"),
        ({"parts": [{"type": "text", "text": "hi", "id": "prt_x"}]}, "parts"),
        ({"parts": [{"type": "text", "text": "hi"}] * 65}, "parts"),
        ({"parts": [{"type": "text", "text": "hi"}], "role": "assistant"}, "role"),
        ({"text": "hi"}, "text"),
    ],
)
def test_bad_message_bodies_are_400_and_store_nothing(
    shared_session: Any, bob: Any, api: Any, body: Any, field: str
) -> None:
    response = api(bob).post(messages_url(shared_session), body, format="json")
    error = assert_error(response, 400, "validation_error")
    assert field in error["details"]
    assert Message.objects.count() == 0 and Part.objects.count() == 0
    shared_session.refresh_from_db()
    assert shared_session.status == {"type": "idle"} and shared_session.last_seq == 3


@pytest.mark.django_db
@pytest.mark.parametrize("escaped", ["\\ud800", "\\udfff", "a\\ud83d"])
def test_text_with_a_lone_surrogate_is_400_not_a_server_error(
    shared_session: Any, bob: Any, api: Any, escaped: str
) -> None:
    raw = ('{"parts": [{"type": "text", "text": "%s"}]}' % escaped).encode()
    response = api(bob).generic("POST", messages_url(shared_session), raw, content_type="application/json")
    assert_error(response, 400, "bad_request")
    assert Message.objects.count() == 0


@pytest.mark.django_db
def test_bad_post_leaves_earlier_messages_alone(shared_session: Any, bob: Any, api: Any) -> None:
    Message.objects.create(session=shared_session, role="user", author=bob, status="completed")
    assert_error(api(bob).post(messages_url(shared_session), {"parts": "x"}, format="json"), 400, "validation_error")
    assert_error(api(bob).post(messages_url(shared_session), b"{oops", content_type="application/json"), 400, "bad_request")
    assert Message.objects.count() == 1


@pytest.mark.django_db
def test_list_is_paginated_oldest_first(shared_session: Any, bob: Any, api: Any) -> None:
    from datetime import timedelta

    from django.utils import timezone

    start = timezone.now()
    ids = [
        Message.objects.create(
            session=shared_session, role="user", author=bob, status="completed",
            created_at=start + timedelta(seconds=i),
        ).id
        for i in range(5)
    ]
    client = api(bob)
    page = client.get(messages_url(shared_session) + "?limit=2").json()
    seen = [m["id"] for m in page["results"]]
    assert set(page) == {"results", "next", "previous"}
    while page["next"]:
        page = client.get(page["next"]).json()
        seen += [m["id"] for m in page["results"]]
    assert seen == ids


@pytest.mark.django_db
def test_viewer_lists_messages(shared_session: Any, carol: Any, api: Any) -> None:
    response = api(carol).get(messages_url(shared_session))
    assert response.status_code == 200
    assert response.json() == {"results": [], "next": None, "previous": None}


# ---------------------------------------------------------------- the echo agent replies (transactional)


@pytest.mark.django_db(transaction=True)
def test_echo_reply_repeats_the_users_text(shared_session: Any, bob: Any, api: Any) -> None:
    said = "Hello there,  world! \u00e9\U0001f600"
    body = api(bob).post(messages_url(shared_session), text(said), format="json").json()
    reply = wait_until(lambda: reply_done(body["reply_id"]))
    assert reply.status == "completed"
    assert reply_text(reply.id) == said
    wait_until(lambda: Session.objects.get(pk=shared_session.pk).status == {"type": "idle"})


@pytest.mark.django_db(transaction=True)
def test_list_shows_the_conversation_oldest_first_with_parts(shared_session: Any, bob: Any, carol: Any, api: Any) -> None:
    body = api(bob).post(messages_url(shared_session), text("first", "second"), format="json").json()
    wait_until(lambda: reply_done(body["reply_id"]))
    wait_until(lambda: Session.objects.get(pk=shared_session.pk).status == {"type": "idle"})
    response = api(carol).get(messages_url(shared_session))
    assert response.status_code == 200
    page = response.json()
    assert page["next"] is None
    user, assistant = page["results"]
    assert user["id"] == body["message"]["id"] and user["role"] == "user"
    assert [p["text"] for p in user["parts"]] == ["first", "second"]
    assert assistant["id"] == body["reply_id"] and assistant["role"] == "assistant"
    assert assistant["status"] == "completed" and assistant["completed_at"].endswith("Z")
    assert assistant["author"] is None
    assert "".join(p["text"] for p in assistant["parts"] if p["type"] == "text") == "first\n\nsecond"


@pytest.mark.django_db(transaction=True)
def test_session_accepts_a_new_message_after_the_reply_ends(shared_session: Any, bob: Any, api: Any) -> None:
    client = api(bob)
    first = client.post(messages_url(shared_session), text("one"), format="json").json()
    wait_until(lambda: reply_done(first["reply_id"]))
    wait_until(lambda: Session.objects.get(pk=shared_session.pk).status == {"type": "idle"})
    second = client.post(messages_url(shared_session), text("two"), format="json")
    assert second.status_code == 202, second.content
    reply = wait_until(lambda: reply_done(second.json()["reply_id"]))
    assert reply_text(reply.id) == "two"
    wait_until(lambda: Session.objects.get(pk=shared_session.pk).status == {"type": "idle"})


@pytest.mark.django_db(transaction=True)
def test_reply_events_are_in_the_log_in_order(shared_session: Any, bob: Any, api: Any) -> None:
    body = api(bob).post(messages_url(shared_session), text("a b c"), format="json").json()
    wait_until(lambda: reply_done(body["reply_id"]))
    wait_until(lambda: Session.objects.get(pk=shared_session.pk).status == {"type": "idle"})
    events = api(bob).get(f"/api/sessions/{shared_session.id}/events/?after=3").json()["events"]
    types = [e["type"] for e in events]
    assert types[:3] == ["message.created", "session.status", "message.created"]
    assert types[-2:] == ["message.completed", "session.status"]
    assert [e["seq"] for e in events] == list(range(4, 4 + len(events)))
    deltas = "".join(e["properties"].get("delta", "") for e in events if e["type"] == "message.part.updated")
    assert deltas == "a b c"


@pytest.mark.django_db(transaction=True)
def test_abort_on_an_idle_session_reports_false(shared_session: Any, bob: Any, api: Any) -> None:
    response = api(bob).post(f"/api/sessions/{shared_session.id}/abort/")
    assert response.status_code == 200 and response.json() == {"aborted": False}


@pytest.mark.django_db
def test_viewer_cannot_abort(shared_session: Any, carol: Any, api: Any) -> None:
    make_busy(shared_session)
    assert_error(api(carol).post(f"/api/sessions/{shared_session.id}/abort/"), 403, "permission_denied")


@pytest.mark.django_db
def test_abort_with_unknown_fields_is_400(shared_session: Any, bob: Any, api: Any) -> None:
    response = api(bob).post(f"/api/sessions/{shared_session.id}/abort/", {"force": True}, format="json")
    error = assert_error(response, 400, "validation_error")
    assert "force" in error["details"]
