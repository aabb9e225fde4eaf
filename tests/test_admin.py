"""The admin: every page renders for a superuser, searches find what they should, the
lists stay at a fixed number of queries, and the event log cannot be edited."""
from __future__ import annotations

import json
from typing import Any

import pytest
from django.contrib import admin as django_admin
from django.contrib.admin.utils import quote
from django.test import Client
from django.test.client import RequestFactory
from django.urls import reverse

from events_app.admin import EventAdmin
from events_app.models import Event
from sessions_app import services
from sessions_app.models import Message, Part, Session


@pytest.fixture
def superuser_client(admin_client: Client) -> Client:
    return admin_client


@pytest.fixture
def with_message(shared_session: Any, alice: Any) -> tuple[Session, Message]:
    """A user message with one text part, stored directly (no reply runs)."""
    message = Message.objects.create(
        session=shared_session, role=Message.MessageRole.USER, author=alice,
        status=Message.Status.COMPLETED,
    )
    Part.objects.create(message=message, index=0, type=Part.PartType.TEXT, text="Hello admin")
    return shared_session, message


def _admin_url(model: str, view: str, pk: object, app: str = "sessions_app") -> str:
    # The admin escapes primary keys in its URLs ("_" becomes "_5F"); an id such as
    # "ses_25…" pasted raw would be read back as "ses%…". Build URLs the way it does.
    return reverse(f"admin:{app}_{model}_{view}", args=[quote(pk)])


def _rows(response: Any) -> list[Any]:
    return list(response.context["cl"].result_list)


# ---------------------------------------------------------------- sessions


def test_session_changelist_shows_counts(superuser_client: Client, with_message: Any) -> None:
    session, _ = with_message
    response = superuser_client.get("/admin/sessions_app/session/")
    assert response.status_code == 200
    [row] = _rows(response)
    assert row.id == session.id
    assert row.member_count == 3  # alice, bob, carol
    assert row.message_count == 1
    body = response.content.decode()
    assert "Fix the login bug" in body and "alice" in body and "idle" in body


def test_session_search_by_title_id_and_owner(
    superuser_client: Client, shared_session: Any, charlie: Any
) -> None:
    other = services.create_session(charlie, title="Unrelated", agent="echo")
    url = "/admin/sessions_app/session/"
    for query in ("login bug", shared_session.id, "alice"):
        ids = [s.id for s in _rows(superuser_client.get(url, {"q": query}))]
        assert ids == [shared_session.id], query
    ids = [s.id for s in _rows(superuser_client.get(url, {"q": "charlie"}))]
    assert ids == [other.id]


def test_session_filters_by_agent_and_owner(
    superuser_client: Client, shared_session: Any, charlie: Any
) -> None:
    services.create_session(charlie, title="Other", agent="echo")
    url = "/admin/sessions_app/session/"
    assert len(_rows(superuser_client.get(url, {"agent": "echo"}))) == 2
    assert _rows(superuser_client.get(url, {"agent": "nope"})) == []
    rows = _rows(superuser_client.get(url, {"owner__id__exact": shared_session.owner_id}))
    assert [s.id for s in rows] == [shared_session.id]


def test_session_changelist_queries_do_not_grow_with_sessions(
    superuser_client: Client, alice: Any, django_assert_max_num_queries: Any
) -> None:
    for i in range(3):
        services.create_session(alice, title=f"s{i}", agent="echo")
    with django_assert_max_num_queries(12) as few:
        superuser_client.get("/admin/sessions_app/session/")
    for i in range(3, 15):
        services.create_session(alice, title=f"s{i}", agent="echo")
    with django_assert_max_num_queries(len(few.captured_queries)):
        response = superuser_client.get("/admin/sessions_app/session/")
    assert len(_rows(response)) == 15


def test_a_forks_page_links_its_source_and_a_search_by_id_finds_forks(
    superuser_client: Client, with_message: Any, bob: Any
) -> None:
    source, message = with_message
    fork = services.fork_session(source, bob, message_id=None, title="the fork")
    body = superuser_client.get(_admin_url("session", "change", fork.id)).content.decode()
    assert _admin_url("session", "change", source.id) in body and message.id in body
    found = _rows(superuser_client.get("/admin/sessions_app/session/", {"q": source.id}))
    assert {s.id for s in found} == {source.id, fork.id}
    services.delete_session(source)
    body = superuser_client.get(_admin_url("session", "change", fork.id)).content.decode()
    assert f"{source.id} (deleted)" in body


def test_session_change_page_shows_members(superuser_client: Client, shared_session: Any) -> None:
    response = superuser_client.get(_admin_url("session", "change", shared_session.id))
    assert response.status_code == 200
    body = response.content.decode()
    for name in ("alice", "bob", "carol"):
        assert name in body


def test_session_admin_cannot_add_or_edit(superuser_client: Client, shared_session: Any) -> None:
    assert superuser_client.get("/admin/sessions_app/session/add/").status_code == 403
    url = _admin_url("session", "change", shared_session.id)
    response = superuser_client.post(url, {"title": "Renamed"})
    assert response.status_code == 403
    shared_session.refresh_from_db()
    assert shared_session.title == "Fix the login bug"


def test_session_delete_goes_through_the_service(
    superuser_client: Client, shared_session: Any, monkeypatch: Any
) -> None:
    deleted: list[str] = []
    real = services.delete_session

    def spy(session: Session) -> None:
        deleted.append(session.id)
        real(session)

    monkeypatch.setattr(services, "delete_session", spy)
    url = _admin_url("session", "delete", shared_session.id)
    assert superuser_client.get(url).status_code == 200
    response = superuser_client.post(url, {"post": "yes"})
    assert response.status_code == 302
    assert deleted == [shared_session.id]
    assert not Session.objects.filter(pk=shared_session.id).exists()


def test_admin_opens_a_session_whose_id_looks_escaped(
    superuser_client: Client, alice: Any, monkeypatch: Any
) -> None:
    # "_25" is how the admin escapes "%": the admin's own links must still find the row.
    monkeypatch.setattr(
        Session._meta.get_field("id"), "default", lambda: "ses_2553cdf921b473a12ea4"
    )
    session = services.create_session(alice, title="Escaped", agent="echo")
    listing = superuser_client.get("/admin/sessions_app/session/").content.decode()
    change_url = _admin_url("session", "change", session.id)
    assert change_url in listing
    assert superuser_client.get(change_url).status_code == 200


# ---------------------------------------------------------------- messages


def test_message_pages_show_parts(superuser_client: Client, with_message: Any) -> None:
    session, message = with_message
    listing = superuser_client.get("/admin/sessions_app/message/")
    assert listing.status_code == 200
    assert [m.id for m in _rows(listing)] == [message.id]
    found = superuser_client.get("/admin/sessions_app/message/", {"q": session.id})
    assert [m.id for m in _rows(found)] == [message.id]
    detail = superuser_client.get(_admin_url("message", "change", message.id))
    assert detail.status_code == 200
    assert "Hello admin" in detail.content.decode()


def test_message_admin_is_read_only(superuser_client: Client, with_message: Any) -> None:
    _, message = with_message
    assert superuser_client.get("/admin/sessions_app/message/add/").status_code == 403
    assert superuser_client.get(_admin_url("message", "delete", message.id)).status_code == 403


# ---------------------------------------------------------------- event log


def test_event_changelist_and_filters(
    superuser_client: Client, shared_session: Any, charlie: Any
) -> None:
    other = services.create_session(charlie, title="Other", agent="echo")
    url = "/admin/events_app/event/"
    response = superuser_client.get(url)
    assert response.status_code == 200
    assert {e.session_id for e in _rows(response)} == {shared_session.id, other.id}

    by_type = _rows(superuser_client.get(url, {"type": "member.added"}))
    assert [e.seq for e in by_type] == [3, 2]  # newest first
    by_session = _rows(superuser_client.get(url, {"q": other.id}))
    assert [(e.session_id, e.type) for e in by_session] == [(other.id, "session.created")]
    by_raw_id = _rows(superuser_client.get(url, {"session__id__exact": shared_session.id}))
    assert len(by_raw_id) == 3


def test_event_change_page_pretty_prints_the_envelope(
    superuser_client: Client, shared_session: Any
) -> None:
    event = Event.objects.get(session=shared_session, seq=1)
    response = superuser_client.get(_admin_url("event", "change", event.pk, app="events_app"))
    assert response.status_code == 200
    body = response.content.decode()
    pretty = json.dumps(json.loads(event.envelope), indent=2, ensure_ascii=False)
    assert '"type": "session.created"' in pretty
    assert "&quot;type&quot;: &quot;session.created&quot;" in body  # escaped, indented JSON
    assert "<pre" in body


def test_event_admin_refuses_add_change_and_delete(
    superuser_client: Client, shared_session: Any, admin_user: Any
) -> None:
    event = Event.objects.get(session=shared_session, seq=1)
    base = "/admin/events_app/event/"
    assert superuser_client.get(f"{base}add/").status_code == 403
    assert superuser_client.post(f"{base}add/", {"type": "x.y"}).status_code == 403
    change = superuser_client.post(f"{base}{event.pk}/change/", {"type": "forged.type"})
    assert change.status_code == 403
    assert superuser_client.get(f"{base}{event.pk}/delete/").status_code == 403
    assert superuser_client.post(f"{base}{event.pk}/delete/", {"post": "yes"}).status_code == 403
    bulk = superuser_client.post(
        base, {"action": "delete_selected", "_selected_action": [event.pk], "post": "yes"}
    )
    assert bulk.status_code in (200, 302)
    event.refresh_from_db()
    assert event.type == "session.created"

    request = RequestFactory().get(base)
    request.user = admin_user
    model_admin = django_admin.site._registry[Event]
    assert isinstance(model_admin, EventAdmin)
    assert not model_admin.has_add_permission(request)
    assert not model_admin.has_change_permission(request, event)
    assert not model_admin.has_delete_permission(request, event)
    assert "delete_selected" not in model_admin.get_actions(request)
    assert model_admin.has_view_permission(request, event)


# ---------------------------------------------------------------- session inspection


def test_session_page_shows_messages_parts_pending_permissions_and_latest_events(
    superuser_client: Client, with_message: Any, alice: Any
) -> None:
    from sessions_app.models import PermissionRequest

    session, message = with_message
    reply = Message.objects.create(session=session, role=Message.MessageRole.ASSISTANT, status="streaming")
    pending = services.request_permission(session.id, reply.id, "call_1", "calculator", {"expression": "6*7"})
    answered = services.request_permission(session.id, reply.id, "call_2", "calculator", {"expression": "1"})
    PermissionRequest.objects.filter(pk=answered.pk).update(status="approved")
    body = superuser_client.get(_admin_url("session", "change", session.id)).content.decode()
    assert "Hello admin" in body  # the message's part
    assert pending.id in body and "6*7" in body
    assert answered.id not in body  # only pending requests are listed
    assert "permission.requested" in body and "session.created" in body  # latest events


def test_status_filter(superuser_client: Client, shared_session: Any, charlie: Any) -> None:
    other = services.create_session(charlie, title="Other", agent="echo")
    Session.objects.filter(pk=other.pk).update(status={"type": "busy"})
    busy = superuser_client.get("/admin/sessions_app/session/", {"status": "busy"})
    assert [s.id for s in _rows(busy)] == [other.id]
    idle = superuser_client.get("/admin/sessions_app/session/", {"status": "idle"})
    assert [s.id for s in _rows(idle)] == [shared_session.id]


@pytest.mark.django_db(transaction=True)
def test_abort_action_cancels_a_running_reply(superuser_client: Client, shared_session: Any, bob: Any) -> None:
    from tests.replies import head, post, wait_for_completed

    Session.objects.filter(pk=shared_session.pk).update(agent="tools")
    before = head(shared_session.id)
    reply_id = post(bob, shared_session.id, "!calc 1+1").json()["reply_id"]  # waits for permission
    response = superuser_client.post(
        "/admin/sessions_app/session/",
        {"action": "abort_replies", "_selected_action": [shared_session.id]},
    )
    assert response.status_code == 302
    completed = wait_for_completed(shared_session.id, before, reply_id)
    assert completed["properties"]["status"] == "cancelled"


def test_prune_action_applies_retention_now(
    superuser_client: Client, shared_session: Any, settings: Any
) -> None:
    from events_app.services import publish

    for i in range(5):
        publish(shared_session.id, "task.progress", {"i": i})
    settings.TANDEM_EVENT_RETENTION_COUNT = 2
    response = superuser_client.post(
        "/admin/sessions_app/session/",
        {"action": "prune_events", "_selected_action": [shared_session.id]},
    )
    assert response.status_code == 302
    head = Session.objects.get(pk=shared_session.pk).last_seq
    assert list(Event.objects.filter(session=shared_session).values_list("seq", flat=True).order_by("seq")) == [head - 1, head]


def test_withdraw_action_removes_only_queued_messages_and_publishes(
    superuser_client: Client, shared_session: Any, bob: Any
) -> None:
    from tests.replies import head, log_after

    Session.objects.filter(pk=shared_session.pk).update(status={"type": "busy"})
    queued = services.post_message(shared_session.id, bob, [{"type": "text", "text": "wait"}]).message
    done = Message.objects.create(session=shared_session, role="user", author=bob, status="completed")
    before = head(shared_session.id)
    response = superuser_client.post(
        "/admin/sessions_app/message/",
        {"action": "withdraw_queued", "_selected_action": [queued.pk, done.pk]},
    )
    assert response.status_code == 302
    assert not Message.objects.filter(pk=queued.pk).exists() and Message.objects.filter(pk=done.pk).exists()
    assert [(e["type"], e["properties"]) for e in log_after(shared_session.id, before)] == [
        ("message.removed", {"message_id": queued.pk})
    ]


# ---------------------------------------------------------------- the shared document


def test_session_page_shows_the_documents_text_and_size(
    superuser_client: Client, shared_session: Any, alice: Any
) -> None:
    from sessions_app import doc as docs

    docs.apply_edits(alice, shared_session.id, [{"at": 0, "insert": "# Plan <b>bold</b>"}])
    state = docs.append_paragraph(docs.AGENT, shared_session.id, "Ship on Friday.")
    body = superuser_client.get(_admin_url("session", "change", shared_session.id)).content.decode()
    text = "# Plan <b>bold</b>\n\nShip on Friday."
    assert state.text == text
    assert f"{len(text)} characters, version {state.version}" in body
    assert "# Plan &lt;b&gt;bold&lt;/b&gt;\n\nShip on Friday." in body  # escaped, never rendered
    assert "update(s)" in body


def test_session_page_of_a_session_without_a_document(superuser_client: Client, shared_session: Any) -> None:
    body = superuser_client.get(_admin_url("session", "change", shared_session.id)).content.decode()
    assert "0 characters, version 0" in body and "(empty)" in body


def test_session_changelist_shows_each_documents_version_in_a_fixed_number_of_queries(
    superuser_client: Client, alice: Any, django_assert_max_num_queries: Any
) -> None:
    from sessions_app import doc as docs

    sessions = [services.create_session(alice, title=f"d{i}", agent="echo") for i in range(3)]
    with django_assert_max_num_queries(12) as few:
        superuser_client.get("/admin/sessions_app/session/")
    for session in sessions:
        docs.apply_edits(alice, session.id, [{"at": 0, "insert": "x"}])
    docs.apply_edits(alice, sessions[0].id, [{"at": 1, "insert": "y"}])
    with django_assert_max_num_queries(len(few.captured_queries)):
        response = superuser_client.get("/admin/sessions_app/session/")
    versions = {s.id: s.doc_version for s in _rows(response)}
    assert versions[sessions[0].id] == docs.read_doc(sessions[0].id).version > versions[sessions[1].id] > 0


# ---------------------------------------------------------------- API keys


def test_api_key_list_shows_whose_each_key_is_and_its_last_use(
    superuser_client: Client, alice: Any, bob: Any
) -> None:
    from sessions_app.keys import key_owner

    _, raw = services.create_api_key(alice, "ci runner")
    services.create_api_key(bob, "laptop")
    key_owner(raw)  # used once
    response = superuser_client.get("/admin/sessions_app/apikey/")
    assert response.status_code == 200
    rows = {row.name: row for row in _rows(response)}
    assert set(rows) == {"ci runner", "laptop"}
    assert rows["ci runner"].last_used_at is not None and rows["laptop"].last_used_at is None
    body = response.content.decode()
    assert raw not in body and rows["ci runner"].prefix in body
    found = _rows(superuser_client.get("/admin/sessions_app/apikey/", {"q": "bob"}))
    assert [row.name for row in found] == ["laptop"]
    # A leaked key is found by the prefix it shows (DEPLOY.md, "A leaked API key").
    found = _rows(superuser_client.get("/admin/sessions_app/apikey/", {"q": raw[:10]}))
    assert [row.name for row in found] == ["ci runner"]


def test_api_key_admin_cannot_add_or_edit(superuser_client: Client, alice: Any) -> None:
    key, _ = services.create_api_key(alice, "laptop")
    assert superuser_client.get("/admin/sessions_app/apikey/add/").status_code == 403
    response = superuser_client.post(_admin_url("apikey", "change", key.pk), {"name": "renamed"})
    assert response.status_code == 403
    key.refresh_from_db()
    assert key.name == "laptop"


def test_api_key_deletes_go_through_the_revocation(
    superuser_client: Client, alice: Any, bob: Any, monkeypatch: Any
) -> None:
    from sessions_app.models import ApiKey

    revoked: list[tuple[str, str]] = []
    real = services.revoke_api_key

    def spy(user: Any, key_id: str) -> None:
        revoked.append((user.username, key_id))
        real(user, key_id)

    monkeypatch.setattr(services, "revoke_api_key", spy)
    one, _ = services.create_api_key(alice, "one")
    two, _ = services.create_api_key(bob, "two")
    three, _ = services.create_api_key(bob, "three")
    response = superuser_client.post(_admin_url("apikey", "delete", one.pk), {"post": "yes"})
    assert response.status_code == 302
    response = superuser_client.post(
        "/admin/sessions_app/apikey/",
        {"action": "delete_selected", "_selected_action": [two.pk, three.pk], "post": "yes"},
    )
    assert response.status_code == 302
    assert sorted(revoked) == sorted([("alice", one.pk), ("bob", two.pk), ("bob", three.pk)])
    assert not ApiKey.objects.exists()
