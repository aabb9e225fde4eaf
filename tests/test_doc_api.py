"""§10 the shared document over REST and through its service: reading, edits in code
points, versions and conflicts, roles, limits, bad input, doc.updated coalescing,
malformed Yjs updates and compaction."""
from __future__ import annotations

import json
import os
import random
from datetime import timedelta
from typing import Any

import pytest
from pycrdt import Doc, Text

from events_app.models import Event
from sessions_app import doc as docs
from sessions_app.models import Document, DocUpdate
from tests.helpers import assert_error, raw

pytestmark = pytest.mark.django_db


def doc_url(session: Any) -> str:
    return f"/api/sessions/{session.id}/doc/"


def patch(api: Any, user: Any, session: Any, body: Any) -> Any:
    return api(user).patch(doc_url(session), body, format="json")


def doc_events(session: Any) -> list[dict[str, Any]]:
    rows = Event.objects.filter(session=session, type="doc.updated").order_by("seq")
    return [json.loads(e.envelope)["properties"] for e in rows]


# ---------------------------------------------------------------- reading


@pytest.mark.parametrize("who", ["alice", "bob", "carol"])
def test_every_member_reads_the_document(shared_session: Any, api: Any, request: Any, who: str) -> None:
    response = api(request.getfixturevalue(who)).get(doc_url(shared_session))
    assert response.status_code == 200
    body = response.json()
    assert body["text"] == "" and body["version"] == 0
    assert set(body) == {"text", "version", "updated_at"} and body["updated_at"].endswith("Z")
    assert not Document.objects.exists()  # reading makes no row


def test_outsider_gets_404_reading_and_writing(shared_session: Any, charlie: Any, api: Any) -> None:
    assert_error(api(charlie).get(doc_url(shared_session)), 404, "not_found")
    assert_error(patch(api, charlie, shared_session, {"edits": [{"at": 0, "insert": "x"}]}), 404, "not_found")
    assert_error(api(charlie).get("/api/sessions/ses_nope/doc/"), 404, "not_found")


def test_viewer_cannot_edit(shared_session: Any, carol: Any, api: Any) -> None:
    assert_error(patch(api, carol, shared_session, {"edits": [{"at": 0, "insert": "x"}]}), 403, "permission_denied")
    assert docs.read_doc(shared_session).text == ""


def test_anonymous_gets_401(shared_session: Any, api: Any) -> None:
    assert api(None).get(doc_url(shared_session)).status_code == 401


# ---------------------------------------------------------------- editing


def test_editor_edits_in_order_in_code_points(shared_session: Any, bob: Any, api: Any) -> None:
    response = patch(api, bob, shared_session, {"edits": [{"at": 0, "insert": "a😀b"}]})
    assert response.status_code == 200, response.content
    assert response.json()["text"] == "a😀b" and response.json()["version"] == 1
    # Positions count code points: 2 is after the emoji, not inside it. The second edit
    # sees the text the first left.
    response = patch(api, bob, shared_session, {"edits": [
        {"at": 2, "insert": "X"}, {"at": 1, "delete": 1}, {"at": 3, "insert": "é!"},
    ]})
    body = response.json()
    assert body["text"] == "aXbé!" and body["version"] == 2
    assert api(bob).get(doc_url(shared_session)).json() == body


def test_version_conflict_applies_nothing(shared_session: Any, alice: Any, bob: Any, api: Any) -> None:
    assert patch(api, alice, shared_session, {"edits": [{"at": 0, "insert": "one"}], "version": 0}).status_code == 200
    error = assert_error(
        patch(api, bob, shared_session, {"edits": [{"at": 0, "insert": "two"}], "version": 0}), 409, "version_conflict"
    )
    assert error["details"]["version"] == 1
    assert docs.read_doc(shared_session).text == "one"
    ok = patch(api, bob, shared_session, {"edits": [{"at": 3, "insert": " two"}], "version": 1})
    assert ok.json()["text"] == "one two" and ok.json()["version"] == 2


def test_position_out_of_range_is_400_and_applies_nothing(shared_session: Any, bob: Any, api: Any) -> None:
    patch(api, bob, shared_session, {"edits": [{"at": 0, "insert": "abc"}]})
    for edits in (
        [{"at": 4, "insert": "x"}],
        [{"at": 2, "delete": 2}],
        [{"at": 0, "insert": "x"}, {"at": 5, "insert": "y"}],  # the first is not kept either
    ):
        error = assert_error(patch(api, bob, shared_session, {"edits": edits}), 400, "validation_error")
        assert "edits" in error["details"]
    state = docs.read_doc(shared_session)
    assert (state.text, state.version) == ("abc", 1)


@pytest.mark.parametrize("body", [
    {},
    {"edits": []},
    {"edits": "abc"},
    {"edits": [{"insert": "x"}]},
    {"edits": [{"at": -1, "insert": "x"}]},
    {"edits": [{"at": "0", "insert": "x"}]},
    {"edits": [{"at": 1.5, "insert": "x"}]},
    {"edits": [{"at": True, "insert": "x"}]},
    {"edits": [{"at": 0, "delete": -2}]},
    {"edits": [{"at": 0, "insert": 5}]},
    {"edits": [{"at": 0, "insert": "x", "colour": "red"}]},
    {"edits": [{"at": 0, "insert": "x"}], "version": "1"},
    {"edits": [{"at": 0, "insert": "x"}], "version": -1},
    {"edits": [{"at": 0, "insert": "x"}], "extra": 1},
    {"edits": [{"at": 10**12, "insert": "x"}]},
    {"edits": [{"at": 0, "insert": "x"}] * 1001},
])
def test_bad_bodies_get_400(shared_session: Any, bob: Any, api: Any, body: Any) -> None:
    assert_error(patch(api, bob, shared_session, body), 400, "validation_error")
    assert docs.doc_version(shared_session) == 0


def test_a_lone_surrogate_gets_400(shared_session: Any, bob: Any, api: Any) -> None:
    response = raw(api(bob), "PATCH", doc_url(shared_session), '{"edits": [{"at": 0, "insert": "\\ud800"}]}')
    assert_error(response, 400, "bad_request")


def test_malformed_json_gets_400(shared_session: Any, bob: Any, api: Any) -> None:
    response = raw(api(bob), "PATCH", doc_url(shared_session), '{"edits": [')
    assert_error(response, 400, "bad_request")
    response = raw(api(bob), "PATCH", doc_url(shared_session), '[1, 2]')
    assert response.status_code == 400


def test_document_beyond_the_limit_is_413(shared_session: Any, bob: Any, api: Any, settings: Any) -> None:
    settings.TANDEM_MAX_DOC_CHARS = 10
    assert patch(api, bob, shared_session, {"edits": [{"at": 0, "insert": "😀" * 10}]}).status_code == 200
    assert_error(patch(api, bob, shared_session, {"edits": [{"at": 0, "insert": "x"}]}), 413, "payload_too_large")
    # Replacing within the limit still works, and deleting always does.
    assert patch(api, bob, shared_session, {"edits": [{"at": 0, "delete": 1, "insert": "y"}]}).status_code == 200
    assert patch(api, bob, shared_session, {"edits": [{"at": 0, "delete": 5}]}).json()["text"] == "😀" * 5


def test_edits_that_change_nothing_keep_the_version(shared_session: Any, bob: Any, api: Any) -> None:
    body = patch(api, bob, shared_session, {"edits": [{"at": 0, "insert": ""}, {"at": 0, "delete": 0}]}).json()
    assert body["version"] == 0 and not DocUpdate.objects.exists()


# ---------------------------------------------------------------- doc.updated


def test_changes_publish_coalesced_doc_updated(shared_session: Any, alice: Any, bob: Any, api: Any, settings: Any) -> None:
    settings.TANDEM_DOC_EVENT_SECONDS = 3600  # nothing after the first within the window
    patch(api, bob, shared_session, {"edits": [{"at": 0, "insert": "a"}]})
    patch(api, alice, shared_session, {"edits": [{"at": 1, "insert": "b"}]})
    assert doc_events(shared_session) == [{"version": 1, "by": {"id": bob.pk, "username": "bob"}}]
    # The window over, the change that waited is announced, by whoever made it last.
    Document.objects.update(event_at=Document.objects.get().event_at - timedelta(hours=2))
    assert docs.announce_if_due(shared_session.id) is None
    assert doc_events(shared_session)[-1] == {"version": 2, "by": {"id": alice.pk, "username": "alice"}}
    assert docs.announce_if_due(shared_session.id) is None
    assert len(doc_events(shared_session)) == 2  # nothing new, nothing said


def test_window_zero_announces_every_change_and_the_agent(shared_session: Any, settings: Any) -> None:
    settings.TANDEM_DOC_EVENT_SECONDS = 0
    docs.apply_edits(docs.AGENT, shared_session, [docs.Edit(0, 0, "plan")])
    docs.append_paragraph(docs.AGENT, shared_session, "step two")
    assert docs.read_doc(shared_session).text == "plan\n\nstep two"
    assert doc_events(shared_session) == [{"version": 1, "by": "agent"}, {"version": 2, "by": "agent"}]


def test_doc_prefix_is_reserved_for_custom_events(shared_session: Any, bob: Any, api: Any) -> None:
    response = api(bob).post(
        f"/api/sessions/{shared_session.id}/events/", {"type": "doc.fake", "properties": {}}, format="json"
    )
    assert response.status_code == 400


# ---------------------------------------------------------------- binary updates


def _client_update(text: str, base: bytes | None = None) -> tuple[Doc[Any], bytes]:
    doc: Doc[Any] = Doc()
    if base:
        doc.apply_update(base)
    before = doc.get_state()
    doc.get("doc", type=Text).insert(0, text)
    return doc, doc.get_update(before)


def test_a_yjs_update_is_stored_and_read_back(shared_session: Any, bob: Any) -> None:
    _, update = _client_update("hello")
    applied = docs.apply_update(bob, shared_session, update)
    assert applied is not None and applied.version == 1
    assert docs.read_doc(shared_session).text == "hello"
    assert docs.apply_update(bob, shared_session, update) is None  # known already: no version
    assert docs.doc_version(shared_session) == 1


def test_random_bytes_and_truncated_updates_never_touch_the_document(shared_session: Any, bob: Any) -> None:
    doc, update = _client_update("kept text")
    docs.apply_update(bob, shared_session, update)
    _, more = _client_update("more ", doc.get_update())
    rng = random.Random(15)
    refused = 0
    for i in range(400):
        bad = more[: rng.randrange(len(more))] if i % 2 else os.urandom(rng.randrange(1, 80))
        try:
            result = docs.apply_update(bob, shared_session, bad)
        except docs.BadUpdate:
            refused += 1
            continue
        assert result is None  # random bytes that decode to nothing new
    assert refused > 300
    state = docs.read_doc(shared_session)
    assert (state.text, state.version) == ("kept text", 1)
    docs.apply_update(bob, shared_session, more)
    assert docs.read_doc(shared_session).text == "more kept text"


def test_an_update_past_the_limit_is_refused_and_not_kept(shared_session: Any, bob: Any, settings: Any) -> None:
    settings.TANDEM_MAX_DOC_CHARS = 5
    _, update = _client_update("123456")
    with pytest.raises(docs.DocTooLarge):
        docs.apply_update(bob, shared_session, update)
    assert docs.read_doc(shared_session).text == "" and not DocUpdate.objects.exists()


def test_compaction_folds_updates_and_keeps_the_text(shared_session: Any, bob: Any) -> None:
    for word in ("one ", "two ", "three "):
        docs.apply_edits(bob, shared_session, [docs.Edit(0, 0, word)])
    docs.apply_edits(bob, shared_session, [docs.Edit(0, 6)])
    assert DocUpdate.objects.count() == 4
    assert docs.compact(shared_session) is True
    row = Document.objects.get()
    assert (row.base_version, row.version, DocUpdate.objects.count()) == (4, 4, 0)
    assert docs.compact(shared_session) is False
    # A fresh process (nothing in memory) reads the same text, and writes on top of it.
    docs._slots.clear()
    assert docs.read_doc(shared_session).text == "two one "
    docs.apply_edits(bob, shared_session, [docs.Edit(8, 0, "!")])
    docs._slots.clear()
    assert docs.read_doc(shared_session).text == "two one !"
    update, version = docs.sync_reply(shared_session, b"\x00")
    fresh: Doc[Any] = Doc()
    fresh.apply_update(update)
    assert str(fresh.get("doc", type=Text)) == "two one !" and version == 5


def test_a_batch_answers_each_update_and_a_refused_one_spoils_none(shared_session: Any, bob: Any, settings: Any) -> None:
    settings.TANDEM_MAX_DOC_CHARS = 12
    peer: Doc[Any] = Doc()
    text = peer.get("doc", type=Text)

    def typed(at: int, s: str) -> bytes:
        before = peer.get_state()
        text.insert(at, s)
        return peer.get_update(before)

    first = typed(0, "abc")
    second = typed(3, "def")
    too_long = typed(6, "0123456789")
    results = docs.apply_updates(shared_session, [
        docs.Incoming(bob, first), docs.Incoming(bob, b"\x01\x02garbage"), docs.Incoming(bob, second),
        docs.Incoming(bob, too_long), docs.Incoming(bob, first),
    ])
    assert isinstance(results[0], docs.Applied) and results[0].version == 1
    assert isinstance(results[1], docs.BadUpdate)
    assert isinstance(results[2], docs.Applied) and results[2].version == 2
    assert isinstance(results[3], docs.DocTooLarge)
    assert results[4] is None  # a duplicate
    assert docs.read_doc(shared_session).text == "abcdef"
    assert list(DocUpdate.objects.order_by("version").values_list("version", flat=True)) == [1, 2]
    docs._slots.clear()  # and the stored updates alone give the same text
    assert docs.read_doc(shared_session).text == "abcdef"


def test_absorbing_a_relayed_update_saves_the_read_back(shared_session: Any, alice: Any, bob: Any) -> None:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    docs.apply_edits(bob, shared_session, [docs.Edit(0, 0, "one")])
    # Another process stores version 2; this one hears of it through its room.
    other: Doc[Any] = Doc()
    other.apply_update(docs.full_state(shared_session)[0])
    before = other.get_state()
    other.get("doc", type=Text).insert(3, " two")
    update = other.get_update(before)
    slot = docs._slots.pop(shared_session.id)
    docs.apply_update(alice, shared_session, update)  # as if elsewhere: this copy is set aside
    docs._slots[shared_session.id] = slot
    assert docs.absorb(shared_session.id, 2, update) is True
    assert docs.absorb(shared_session.id, 2, update) is False  # not the next version any more
    with CaptureQueriesContext(connection) as queries:
        docs.apply_edits(bob, shared_session, [docs.Edit(7, 0, "!")])
    assert not any("docupdate" in q["sql"].lower() and q["sql"].lstrip().upper().startswith("SELECT") for q in queries)
    assert docs.read_doc(shared_session).text == "one two!"


def test_housekeeping_compacts_what_is_due_and_announces_what_was_owed(shared_session: Any, bob: Any, settings: Any) -> None:
    settings.TANDEM_DOC_COMPACT_UPDATES = 3
    settings.TANDEM_DOC_EVENT_SECONDS = 3600
    for word in ("a", "b", "c"):
        docs.apply_edits(bob, shared_session, [docs.Edit(0, 0, word)])
    assert doc_events(shared_session) == [{"version": 1, "by": {"id": bob.pk, "username": "bob"}}]
    # The process that owed the announcement of versions 2-3 died: the sweep makes it.
    long_ago = Document.objects.get().updated_at - timedelta(hours=3)
    Document.objects.update(updated_at=long_ago, event_at=long_ago)
    assert docs.housekeeping() == (1, 1)
    row = Document.objects.get()
    assert (row.base_version, DocUpdate.objects.count()) == (3, 0)
    assert doc_events(shared_session)[-1] == {"version": 3, "by": {"id": bob.pk, "username": "bob"}}
    assert docs.housekeeping() == (0, 0)
    docs._slots.clear()
    assert docs.read_doc(shared_session).text == "cba"


def test_a_change_by_an_account_deleted_since_is_announced_by_null(shared_session: Any, bob: Any, settings: Any) -> None:
    settings.TANDEM_DOC_EVENT_SECONDS = 3600
    docs.apply_edits(bob, shared_session, [docs.Edit(0, 0, "a")])
    docs.apply_edits(bob, shared_session, [docs.Edit(1, 0, "b")])
    bob.delete()
    Document.objects.update(event_at=Document.objects.get().event_at - timedelta(hours=2))
    assert docs.announce_if_due(shared_session.id) is None
    assert doc_events(shared_session)[-1] == {"version": 2, "by": None}


# ---------------------------------------------------------------- the one-statement write

on_postgresql = pytest.mark.skipif(
    os.environ.get("DATABASE_URL", "").split(":")[0] not in ("postgres", "postgresql"),
    reason="the one-statement write is PostgreSQL's (SQLite writes one at a time anyway)",
)


@on_postgresql
@pytest.mark.django_db(transaction=True)
def test_a_live_editors_update_to_a_current_document_is_one_statement(shared_session: Any, bob: Any, settings: Any) -> None:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    settings.TANDEM_DOC_EVENT_SECONDS = 3600  # the first change announces; the next ones wait
    peer, first = _client_update("one")
    assert docs.apply_update(bob, shared_session, first) is not None  # loads the copy (locking path)
    before = peer.get_state()
    peer.get("doc", type=Text).insert(3, " two")
    with CaptureQueriesContext(connection) as queries:
        applied = docs.apply_update(bob, shared_session, peer.get_update(before))
    assert applied is not None and applied.version == 2
    assert len(queries) == 1, [q["sql"] for q in queries]  # no BEGIN, FOR UPDATE, COMMIT round trips
    docs._slots.clear()  # stored, contiguous, and the stored rows alone give the text
    assert docs.read_doc(shared_session).text == "one two"
    assert list(DocUpdate.objects.order_by("version").values_list("version", flat=True)) == [1, 2]


@pytest.mark.django_db(transaction=True)
def test_a_write_by_another_process_meanwhile_is_kept_and_versions_stay_contiguous(shared_session: Any, alice: Any, bob: Any) -> None:
    peer, first = _client_update("one")
    docs.apply_update(bob, shared_session, first)
    # Another process stores version 2 while this one's copy (at 1, with no other process
    # heard from) is set aside: this process's next update must not take version 2.
    other: Doc[Any] = Doc()
    other.apply_update(docs.full_state(shared_session)[0])
    before = other.get_state()
    other.get("doc", type=Text).insert(0, "zero ")
    elsewhere = other.get_update(before)
    slot = docs._slots.pop(shared_session.id)
    docs.apply_update(alice, shared_session, elsewhere)
    docs._slots[shared_session.id] = slot
    before = peer.get_state()
    peer.get("doc", type=Text).insert(3, " two")
    applied = docs.apply_update(bob, shared_session, peer.get_update(before))
    assert applied is not None and applied.version == 3
    assert docs.read_doc(shared_session).text == "zero one two"
    assert list(DocUpdate.objects.order_by("version").values_list("version", flat=True)) == [1, 2, 3]
    docs._slots.clear()
    assert docs.read_doc(shared_session).text == "zero one two"


@pytest.mark.django_db(transaction=True)
def test_updates_stored_quickly_are_announced_by_doc_updated(shared_session: Any, bob: Any, settings: Any) -> None:
    settings.TANDEM_DOC_EVENT_SECONDS = 0
    peer, first = _client_update("a")
    docs.apply_update(bob, shared_session, first)
    for ch in "bc":
        before = peer.get_state()
        text = peer.get("doc", type=Text)
        text.insert(len(text), ch)
        docs.apply_update(bob, shared_session, peer.get_update(before))
    assert [e["version"] for e in doc_events(shared_session)] == [1, 2, 3]
    assert all(e["by"]["username"] == bob.username for e in doc_events(shared_session))
