"""Reading a conversation backwards (``GET …/messages/?latest=true`` and ``?before=``):
the session page opens on the latest page and loads older messages on demand. alice owns
the session, bob edits, carol views, charlie is an outsider."""
from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from sessions_app import services
from sessions_app.models import Message, Session
from tests.conftest import client_for
from tests.helpers import assert_error


def url(session: Any) -> str:
    return f"/api/sessions/{session.id}/messages/"


def conversation(session: Any, author: Any, n: int) -> list[str]:
    """n ended messages with distinct turns, oldest first; their ids."""
    start = timezone.now() - timedelta(hours=1)
    ids = []
    for i in range(n):
        at = start + timedelta(seconds=i)
        m = Message.objects.create(session=session, role="user", author=author, status="completed",
                                   created_at=at, turn_at=at, completed_at=at)
        ids.append(m.pk)
    return ids


def ids(page: dict[str, Any]) -> list[str]:
    return [m["id"] for m in page["results"]]


@pytest.mark.django_db
def test_latest_gives_the_end_of_the_conversation_oldest_first(shared_session: Any, carol: Any) -> None:
    made = conversation(shared_session, carol, 7)
    page = client_for(carol).get(url(shared_session), {"latest": "true", "limit": 3}).json()
    assert ids(page) == made[4:]
    assert page["next"] is None and page["previous"]


@pytest.mark.django_db
def test_following_previous_reads_the_whole_conversation_back_once(shared_session: Any, bob: Any) -> None:
    made = conversation(shared_session, bob, 7)
    page = client_for(bob).get(url(shared_session), {"latest": "true", "limit": 3}).json()
    seen = ids(page)
    while page["previous"]:
        page = client_for(bob).get(page["previous"]).json()
        seen = ids(page) + seen
    assert seen == made


@pytest.mark.django_db
def test_before_gives_the_messages_just_before_one(shared_session: Any, bob: Any) -> None:
    made = conversation(shared_session, bob, 5)
    page = client_for(bob).get(url(shared_session), {"before": made[3], "limit": 2}).json()
    assert ids(page) == made[1:3] and page["previous"]
    first = client_for(bob).get(url(shared_session), {"before": made[1], "limit": 2}).json()
    assert ids(first) == made[:1] and first["previous"] is None


@pytest.mark.django_db
def test_messages_with_the_same_turn_time_are_neither_lost_nor_repeated(shared_session: Any, bob: Any) -> None:
    at = timezone.now()
    made = sorted(Message.objects.create(session=shared_session, role="user", author=bob, status="completed",
                                         created_at=at, turn_at=at).pk for _ in range(5))
    page = client_for(bob).get(url(shared_session), {"latest": "1", "limit": 2}).json()
    seen = ids(page)
    while page["previous"]:
        page = client_for(bob).get(page["previous"]).json()
        seen = ids(page) + seen
    assert seen == made


@pytest.mark.django_db
def test_the_queue_ends_the_latest_page_only(shared_session: Any, bob: Any) -> None:
    made = conversation(shared_session, bob, 3)
    Session.objects.filter(pk=shared_session.pk).update(status={"type": "busy"})
    posted = client_for(bob).post(url(shared_session), {"parts": [{"type": "text", "text": "wait"}]}, format="json")
    assert posted.status_code == 202, posted.content
    queued = posted.json()["message"]["id"]
    latest = client_for(bob).get(url(shared_session), {"latest": "true", "limit": 2}).json()
    assert ids(latest) == [*made[1:], queued]
    earlier = client_for(bob).get(latest["previous"]).json()
    assert ids(earlier) == made[:1]
    # A queued message has no place in the conversation yet: nothing is "before" it.
    assert_error(client_for(bob).get(url(shared_session), {"before": queued}), 400, "validation_error")


@pytest.mark.django_db
def test_forward_pages_still_work_and_link_back(shared_session: Any, bob: Any) -> None:
    made = conversation(shared_session, bob, 3)
    first = client_for(bob).get(url(shared_session), {"limit": 2}).json()
    assert ids(first) == made[:2] and first["previous"] is None
    second = client_for(bob).get(first["next"]).json()
    assert ids(second) == made[2:] and second["next"] is None
    assert ids(client_for(bob).get(second["previous"]).json()) == made[:2]


@pytest.mark.django_db
def test_an_empty_conversation_has_an_empty_latest_page(shared_session: Any, alice: Any) -> None:
    assert client_for(alice).get(url(shared_session), {"latest": "true"}).json() == {
        "results": [], "next": None, "previous": None}


@pytest.mark.django_db
@pytest.mark.parametrize("query, field", [
    ({"before": "msg_nope"}, "before"),
    ({"before": "x" * 33}, "before"),
    ({"latest": "maybe"}, "latest"),
    ({"latest": "true", "before": "msg_x"}, "before"),
    ({"latest": "true", "cursor": "abc"}, "cursor"),
    ({"order": "newest"}, "order"),
])
def test_bad_paging_parameters_are_a_validation_error(shared_session: Any, bob: Any, query: dict[str, str], field: str) -> None:
    conversation(shared_session, bob, 1)
    error = assert_error(client_for(bob).get(url(shared_session), query), 400, "validation_error")
    assert field in error["details"], error


@pytest.mark.django_db
def test_before_a_message_of_another_session_is_refused(shared_session: Any, alice: Any, bob: Any) -> None:
    other = services.create_session(alice, title="other", agent="echo")
    foreign = Message.objects.create(session=other, role="user", author=alice, status="completed").pk
    assert_error(client_for(bob).get(url(shared_session), {"before": foreign}), 400, "validation_error")


@pytest.mark.django_db
def test_outsiders_get_404_whatever_they_ask(shared_session: Any, charlie: Any) -> None:
    assert_error(client_for(charlie).get(url(shared_session), {"latest": "true"}), 404, "not_found")
    assert_error(client_for(charlie).get(url(shared_session), {"before": "msg_x"}), 404, "not_found")
