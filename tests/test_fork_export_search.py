"""§3 fork, export and search: who may, what they hold, bad input. Runs on SQLite and,
with DATABASE_URL, on PostgreSQL (full-text search there)."""
from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.utils import timezone

from events_app.models import Event
from sessions_app import services
from sessions_app.models import Message, Part, PermissionRequest, Session
from tests.helpers import assert_error

pytestmark = pytest.mark.django_db

_clock = [timezone.now() - timedelta(hours=1)]


def say(session: Session, author: Any, *texts: str, role: str = "user", status: str = "completed") -> Message:
    """A stored message with text parts (the rows a finished exchange leaves behind)."""
    _clock[0] += timedelta(seconds=1)
    message = Message.objects.create(
        session=session, role=role, author=author if role == "user" else None, status=status,
        created_at=_clock[0], completed_at=None if status == "streaming" else _clock[0],
    )
    for i, text in enumerate(texts):
        Part.objects.create(message=message, index=i, type="text", text=text)
    return message


@pytest.fixture
def talk(shared_session: Any, alice: Any, bob: Any) -> list[Message]:
    return [
        say(shared_session, alice, "Where is the login form?"),
        say(shared_session, None, "In templates/registration.", role="assistant"),
        say(shared_session, bob, "And the **password** reset?"),
        say(shared_session, None, "Not written yet.", role="assistant"),
    ]


def fork(api: Any, user: Any, session: Session, **body: Any) -> Any:
    return api(user).post(f"/api/sessions/{session.id}/fork/", body, format="json")


def texts_of(session_id: str) -> list[str]:
    return [
        "".join(p.text for p in m.parts.all())
        for m in Message.objects.filter(session_id=session_id).prefetch_related("parts")
    ]


# ---------------------------------------------------------------- fork


def test_fork_copies_every_message_into_a_session_the_caller_owns(
    shared_session: Any, talk: list[Message], bob: Any, api: Any
) -> None:
    response = fork(api, bob, shared_session)
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["role"] == "owner" and body["owner"]["username"] == "bob"
    assert body["agent"] == shared_session.agent and body["title"] == shared_session.title
    assert body["forked_from"] == {"session_id": shared_session.id, "message_id": talk[-1].id}
    assert texts_of(body["id"]) == texts_of(shared_session.id)
    copies = list(Message.objects.filter(session_id=body["id"]))
    assert {m.id for m in copies}.isdisjoint(m.id for m in talk)
    assert [(m.role, m.author_id, m.status) for m in copies] == [(m.role, m.author_id, m.status) for m in talk]
    # Only bob is in the fork; the source is untouched.
    assert api(bob).get(f"/api/sessions/{body['id']}/members/").json() == [
        {"user": {"id": bob.pk, "username": "bob"}, "role": "owner"}
    ]
    assert len(texts_of(shared_session.id)) == 4


def test_fork_up_to_a_message_with_a_title(shared_session: Any, talk: list[Message], carol: Any, api: Any) -> None:
    response = fork(api, carol, shared_session, message_id=talk[1].id, title="Just the form")
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["title"] == "Just the form"
    assert body["forked_from"] == {"session_id": shared_session.id, "message_id": talk[1].id}
    assert texts_of(body["id"]) == ["Where is the login form?", "In templates/registration."]


def test_fork_leaves_out_a_reply_still_streaming(shared_session: Any, talk: list[Message], alice: Any, api: Any) -> None:
    streaming = say(shared_session, None, "half a rep", role="assistant", status="streaming")
    body = fork(api, alice, shared_session).json()
    assert len(texts_of(body["id"])) == 4
    assert body["forked_from"]["message_id"] == talk[-1].id
    assert_error(fork(api, alice, shared_session, message_id=streaming.id), 409, "conflict")


def test_fork_log_starts_at_one_and_replays_the_conversation(
    shared_session: Any, talk: list[Message], alice: Any, api: Any
) -> None:
    body = fork(api, alice, shared_session).json()
    events = [json.loads(e) for e in Event.objects.filter(session_id=body["id"]).order_by("seq").values_list("envelope", flat=True)]
    assert [e["seq"] for e in events] == list(range(1, 6))
    assert [e["type"] for e in events] == ["session.created"] + ["message.created"] * 4
    assert events[0]["properties"]["session"]["forked_from"]["session_id"] == shared_session.id
    replayed = ["".join(p["text"] for p in e["properties"]["message"]["parts"]) for e in events[1:]]
    assert replayed == texts_of(shared_session.id)
    assert Session.objects.get(pk=body["id"]).last_seq == 5
    listed = api(alice).get(f"/api/sessions/{body['id']}/messages/").json()["results"]
    assert [m["id"] for m in listed] == [e["properties"]["message"]["id"] for e in events[1:]]


def test_fork_keeps_order_of_messages_made_at_the_same_moment(shared_session: Any, alice: Any, api: Any) -> None:
    same = timezone.now()
    for i in range(6):
        m = Message.objects.create(session=shared_session, role="user", author=alice, status="completed", created_at=same)
        Part.objects.create(message=m, index=0, type="text", text=f"m{i}")
    body = fork(api, alice, shared_session).json()
    assert texts_of(body["id"]) == texts_of(shared_session.id)


def test_fork_of_a_message_from_another_session_is_404(
    shared_session: Any, talk: list[Message], alice: Any, api: Any
) -> None:
    other = services.create_session(alice, title="other", agent="echo")
    foreign = say(other, alice, "elsewhere")
    assert_error(fork(api, alice, shared_session, message_id=foreign.id), 404, "not_found")
    assert_error(fork(api, alice, shared_session, message_id="msg_nope"), 404, "not_found")
    assert Session.objects.count() == 2


def test_fork_by_an_outsider_is_404(shared_session: Any, talk: list[Message], charlie: Any, api: Any) -> None:
    assert_error(fork(api, charlie, shared_session), 404, "not_found")


@pytest.mark.parametrize(
    "body",
    [{"message_id": 5}, {"title": "x" * 201}, {"message_id": "m" * 33}, {"extra": 1}, {"title": None}],
)
def test_fork_bad_input_is_400(shared_session: Any, alice: Any, api: Any, body: dict[str, Any]) -> None:
    assert_error(fork(api, alice, shared_session, **body), 400, "validation_error")


def test_sessions_not_forked_say_so(shared_session: Any, alice: Any, api: Any) -> None:
    assert api(alice).get(f"/api/sessions/{shared_session.id}/").json()["forked_from"] is None


# ---------------------------------------------------------------- export


def export(api: Any, user: Any, session: Session, fmt: str | None = None) -> Any:
    query = "" if fmt is None else f"?format={fmt}"
    return api(user).get(f"/api/sessions/{session.id}/export/{query}")


def test_export_markdown_is_an_attachment_transcript(shared_session: Any, talk: list[Message], carol: Any, api: Any) -> None:
    response = export(api, carol, shared_session, "markdown")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/markdown")
    assert response["Content-Disposition"] == f'attachment; filename="tandem-{shared_session.id}.md"'
    text = response.content.decode()
    assert text.startswith("# Fix the login bug\n")
    assert "alice (owner), bob (editor), carol (viewer)" in text
    positions = [text.index(t) for t in texts_of(shared_session.id)]
    assert positions == sorted(positions)
    assert "## bob ·" in text and "## assistant ·" in text
    assert export(api, carol, shared_session).content == response.content  # markdown is the default


def test_export_json_holds_session_members_messages_permissions(
    shared_session: Any, talk: list[Message], bob: Any, api: Any
) -> None:
    PermissionRequest.objects.create(
        session=shared_session, message=talk[1], call_id="c1", tool="calculator",
        input={"expression": "1+1"}, expires_at=timezone.now(),
    )
    response = export(api, bob, shared_session, "json")
    assert response.status_code == 200
    assert response["Content-Type"] == "application/json"
    assert response["Content-Disposition"] == f'attachment; filename="tandem-{shared_session.id}.json"'
    body = response.json()
    assert set(body) == {"session", "members", "messages", "permissions"}
    assert body["session"]["id"] == shared_session.id and body["session"]["role"] == "editor"
    assert [m["user"]["username"] for m in body["members"]] == ["alice", "bob", "carol"]
    assert [m["id"] for m in body["messages"]] == [m.id for m in talk]
    assert body["messages"][2]["parts"][0]["text"] == "And the **password** reset?"
    assert [p["tool"] for p in body["permissions"]] == ["calculator"]


def test_export_as_non_member_is_404(shared_session: Any, talk: list[Message], charlie: Any, api: Any) -> None:
    assert_error(export(api, charlie, shared_session, "json"), 404, "not_found")
    assert_error(export(api, charlie, shared_session), 404, "not_found")


@pytest.mark.parametrize("query", ["?format=pdf", "?format=", "?format=json&x=1"])
def test_export_bad_format_is_400(shared_session: Any, alice: Any, api: Any, query: str) -> None:
    response = api(alice).get(f"/api/sessions/{shared_session.id}/export/{query}")
    assert_error(response, 400, "validation_error")


# ---------------------------------------------------------------- search


def find(api: Any, user: Any, q: str, **params: Any) -> Any:
    return api(user).get("/api/search/", {"q": q, **params})


def test_search_finds_message_text_with_a_marked_snippet(shared_session: Any, talk: list[Message], bob: Any, api: Any) -> None:
    response = find(api, bob, "password")
    assert response.status_code == 200, response.content
    body = response.json()
    assert set(body) == {"results", "next"} and body["next"] is None
    (hit,) = body["results"]
    assert set(hit) == {"session", "message_id", "snippet", "highlights", "created_at"}
    assert hit["session"] == {"id": shared_session.id, "title": "Fix the login bug"}
    assert hit["message_id"] == talk[2].id
    assert [hit["snippet"][a:b].lower() for a, b in hit["highlights"]] == ["password"]


def test_search_finds_titles_with_no_message(shared_session: Any, alice: Any, api: Any) -> None:
    (hit,) = find(api, alice, "login").json()["results"]
    assert hit["message_id"] is None and hit["session"]["id"] == shared_session.id
    assert [hit["snippet"][a:b].lower() for a, b in hit["highlights"]] == ["login"]


def test_search_finds_only_the_callers_sessions(shared_session: Any, talk: list[Message], charlie: Any, alice: Any, api: Any) -> None:
    own = services.create_session(charlie, title="charlie's password notes", agent="echo")
    say(own, charlie, "my password is not here")
    hits = find(api, charlie, "password").json()["results"]
    assert {h["session"]["id"] for h in hits} == {own.id}
    assert own.id not in {h["session"]["id"] for h in find(api, alice, "password").json()["results"]}


def test_search_ranks_the_better_match_first(alice: Any, api: Any) -> None:
    session = services.create_session(alice, title="", agent="echo")
    once = say(session, alice, "a note about the quantum computer and other things to buy")
    thrice = say(session, alice, "quantum quantum quantum")
    say(session, alice, "nothing to see")
    hits = find(api, alice, "quantum").json()["results"]
    assert [h["message_id"] for h in hits] == [thrice.id, once.id]


def test_search_pages_follow_next(alice: Any, api: Any) -> None:
    session = services.create_session(alice, title="", agent="echo")
    made = {say(session, alice, f"pagination test {i}").id for i in range(5)}
    seen: list[str] = []
    page = find(api, alice, "pagination", limit=2).json()
    while True:
        assert len(page["results"]) <= 2
        seen += [h["message_id"] for h in page["results"]]
        if page["next"] is None:
            break
        page = api(alice).get(page["next"]).json()
    assert sorted(seen) == sorted(made)


def test_search_one_hit_per_message(alice: Any, api: Any) -> None:
    session = services.create_session(alice, title="", agent="echo")
    message = say(session, alice, "zebra one", "zebra two")
    assert [h["message_id"] for h in find(api, alice, "zebra").json()["results"]] == [message.id]


def test_search_text_is_never_html(alice: Any, api: Any) -> None:
    session = services.create_session(alice, title="", agent="echo")
    text = 'look <img src=x onerror="alert(1)"> <b>here</b> xssword <script>x()</script>'
    say(session, alice, text)
    (hit,) = find(api, alice, "xssword").json()["results"]
    # As written (clients show it as text), not stripped or escaped.
    assert hit["snippet"] == 'look <img src=x onerror="alert(1)"> <b>here</b> xssword <script>x()</script>'
    assert [hit["snippet"][a:b] for a, b in hit["highlights"]] == ["xssword"]


@pytest.mark.parametrize("params", [{"q": ""}, {"q": "x" * 201}, {"q": "   "}, {}, {"q": "a", "limit": 0}, {"q": "a", "zz": 1}])
def test_search_bad_query_is_400(alice: Any, api: Any, params: dict[str, Any]) -> None:
    assert_error(api(alice).get("/api/search/", params), 400, "validation_error")


def test_search_q_of_200_chars_is_fine(alice: Any, api: Any) -> None:
    assert find(api, alice, "x" * 200).status_code == 200


def test_search_bad_cursor_is_400(alice: Any, api: Any) -> None:
    assert_error(find(api, alice, "a", cursor="nonsense!"), 400, "bad_request")


def test_search_needs_credentials(api: Any) -> None:
    assert_error(api(None).get("/api/search/", {"q": "a"}), 401, "not_authenticated")


def test_search_uses_full_text_on_postgresql(alice: Any, api: Any) -> None:
    if connection.vendor != "postgresql":
        pytest.skip("PostgreSQL only: stemming")
    session = services.create_session(alice, title="", agent="echo")
    message = say(session, alice, "The runners were running fast")
    (hit,) = find(api, alice, "run").json()["results"]
    assert hit["message_id"] == message.id
    with connection.cursor() as cursor:
        cursor.execute("SELECT indexname FROM pg_indexes WHERE indexname LIKE '%%_fts'")
        assert {r[0] for r in cursor.fetchall()} == {"sessions_app_part_text_fts", "sessions_app_session_title_fts"}


def test_search_queries_can_use_the_gin_indexes_on_postgresql(alice: Any) -> None:
    """The queries' expressions must match the migration's index expressions exactly."""
    if connection.vendor != "postgresql":
        pytest.skip("PostgreSQL only")
    from django.contrib.postgres.search import SearchQuery

    from sessions_app import search

    query = SearchQuery("login", config=search.SEARCH_CONFIG, search_type="websearch")
    for queryset, index in [
        (Part.objects.annotate(match=search._vector("text")).filter(match=query), "sessions_app_part_text_fts"),
        (Session.objects.annotate(match=search._vector("title")).filter(match=query), "sessions_app_session_title_fts"),
    ]:
        with connection.cursor() as cursor:
            cursor.execute("SET LOCAL enable_seqscan = off")
        assert index in queryset.explain(), queryset.explain()


@pytest.mark.parametrize("q", ["a & b | !c", "'\"", "login:*", "(((", "-", "ünïcödé ✓", "%_"])
def test_search_any_text_is_a_query_never_an_error(shared_session: Any, talk: list[Message], alice: Any, api: Any, q: str) -> None:
    response = find(api, alice, q)
    assert response.status_code == 200, response.content
    assert set(response.json()) == {"results", "next"}


def test_search_nul_is_400(alice: Any, api: Any) -> None:
    assert_error(find(api, alice, "a\x00b"), 400, "validation_error")


def test_fork_message_id_with_nul_is_400(shared_session: Any, alice: Any, api: Any) -> None:
    assert_error(fork(api, alice, shared_session, message_id="msg\x00"), 400, "validation_error")
