"""§3 "Posting while a reply runs", withdrawing a queued message, retrying the latest
reply, automatic titles. alice owns the session, bob edits, carol views, charlie is an
outsider. The first group runs no reply (the plain db fixture never fires on_commit), so
the queue stays exactly as the test leaves it; the second runs real echo replies."""
from __future__ import annotations

import threading
from typing import Any

import pytest
from django.db import connection, transaction

from sessions_app import services
from sessions_app.models import Membership, Message, ReplyRun, Session
from sessions_app.runs import lock_session
from tests.conftest import client_for, wait_until
from tests.helpers import assert_error
from tests.replies import head, log_after, post, wait_for_completed, wait_idle


def url(session: Any, tail: str = "") -> str:
    return f"/api/sessions/{session.id}/messages/{tail}"


def body(text: str, **extra: Any) -> dict[str, Any]:
    return {"parts": [{"type": "text", "text": text}], **extra}


def make_busy(session: Any) -> None:
    Session.objects.filter(pk=session.pk).update(status={"type": "busy"})


def queue(user: Any, session: Any, text: str, **extra: Any) -> dict[str, Any]:
    response = client_for(user).post(url(session), body(text, **extra), format="json")
    assert response.status_code == 202, response.content
    return response.json()  # type: ignore[no-any-return]


def events_of(session: Any, after: int, *types: str) -> list[dict[str, Any]]:
    return [e for e in log_after(session.id, after) if e["type"] in types]


# ---------------------------------------------------------------- queueing (no reply runs)


@pytest.mark.django_db
def test_a_message_posted_while_busy_is_queued_with_its_position(shared_session: Any, alice: Any, bob: Any) -> None:
    make_busy(shared_session)
    before = head(shared_session.id)
    first = queue(bob, shared_session, "one")
    second = queue(alice, shared_session, "two", if_busy="queue")
    assert set(first) == {"message", "reply_id", "queued", "position"}
    assert (first["reply_id"], first["queued"], first["position"]) == (None, True, 1)
    assert (second["reply_id"], second["queued"], second["position"]) == (None, True, 2)
    assert first["message"]["status"] == "queued" and first["message"]["completed_at"] is None
    created = events_of(shared_session, before, "message.created")
    assert [e["properties"]["message"]["id"] for e in created] == [first["message"]["id"], second["message"]["id"]]
    assert all(e["properties"]["message"]["status"] == "queued" for e in created)
    # Queuing neither starts a reply nor changes the session's status.
    assert not Message.objects.filter(role="assistant").exists()
    assert not events_of(shared_session, before, "session.status")


@pytest.mark.django_db
@pytest.mark.parametrize("bad", ["later", "", "QUEUE", 1, None, True, ["queue"]])
def test_if_busy_not_one_of_the_three_is_400_validation_error(shared_session: Any, bob: Any, bad: Any) -> None:
    before = head(shared_session.id)
    response = client_for(bob).post(url(shared_session), body("x", if_busy=bad), format="json")
    error = assert_error(response, 400, "validation_error")
    assert "if_busy" in error["details"]
    assert not Message.objects.exists() and head(shared_session.id) == before


@pytest.mark.django_db
def test_the_21st_queued_message_is_409_queue_full(shared_session: Any, bob: Any) -> None:
    make_busy(shared_session)
    for i in range(20):
        assert queue(bob, shared_session, f"m{i}")["position"] == i + 1
    before = head(shared_session.id)
    response = client_for(bob).post(url(shared_session), body("one too many"), format="json")
    assert_error(response, 409, "queue_full")
    assert Message.objects.filter(status="queued").count() == 20 and head(shared_session.id) == before


@pytest.mark.django_db
def test_max_queued_setting_bounds_the_queue(shared_session: Any, bob: Any, settings: Any) -> None:
    settings.TANDEM_MAX_QUEUED = 0
    make_busy(shared_session)
    assert_error(client_for(bob).post(url(shared_session), body("x"), format="json"), 409, "queue_full")


@pytest.mark.django_db
def test_reject_refuses_even_while_only_the_queue_is_waiting(shared_session: Any, bob: Any) -> None:
    make_busy(shared_session)
    queue(bob, shared_session, "waiting")
    Session.objects.filter(pk=shared_session.pk).update(status={"type": "idle"})
    assert_error(client_for(bob).post(url(shared_session), body("x", if_busy="reject"), format="json"), 409, "session_busy")
    # A plain post joins the queue behind it rather than jumping ahead.
    assert queue(bob, shared_session, "behind")["position"] == 2


@pytest.mark.django_db
def test_interrupt_puts_the_message_first_in_the_queue(shared_session: Any, alice: Any, bob: Any) -> None:
    make_busy(shared_session)
    queue(bob, shared_session, "one")
    queue(bob, shared_session, "two")
    urgent = queue(alice, shared_session, "stop, do this", if_busy="interrupt")
    assert urgent["position"] == 1
    listed = client_for(bob).get(url(shared_session)).json()["results"]
    assert [m["parts"][0]["text"] for m in listed] == ["stop, do this", "one", "two"]


@pytest.mark.django_db
def test_viewer_and_outsider_cannot_queue(shared_session: Any, carol: Any, charlie: Any) -> None:
    make_busy(shared_session)
    assert_error(client_for(carol).post(url(shared_session), body("x"), format="json"), 403, "permission_denied")
    assert_error(client_for(charlie).post(url(shared_session), body("x"), format="json"), 404, "not_found")
    assert not Message.objects.exists()


@pytest.mark.django_db
def test_messages_list_shows_queued_messages_after_the_others_in_posting_order(
    shared_session: Any, alice: Any, bob: Any
) -> None:
    started = queue(bob, shared_session, "first")  # idle: answered now
    assert started["reply_id"] is not None and "queued" not in started
    queue(alice, shared_session, "second")
    queue(bob, shared_session, "third")
    listed = client_for(alice).get(url(shared_session)).json()
    assert listed["next"] is None
    assert [(m["role"], m["status"]) for m in listed["results"]] == [
        ("user", "completed"), ("assistant", "streaming"), ("user", "queued"), ("user", "queued"),
    ]
    assert [m["parts"][0]["text"] for m in listed["results"] if m["role"] == "user"] == ["first", "second", "third"]


@pytest.mark.django_db
def test_queued_messages_come_only_on_the_last_page(shared_session: Any, bob: Any) -> None:
    for _ in range(3):
        Message.objects.create(session=shared_session, role="user", author=bob, status="completed")
    make_busy(shared_session)
    queued_id = queue(bob, shared_session, "waiting")["message"]["id"]
    first = client_for(bob).get(url(shared_session), {"limit": 2}).json()
    assert first["next"] and queued_id not in [m["id"] for m in first["results"]]
    second = client_for(bob).get(first["next"]).json()
    assert second["next"] is None and [m["id"] for m in second["results"]][-1] == queued_id


# ---------------------------------------------------------------- withdrawing


@pytest.mark.django_db
def test_author_withdraws_a_queued_message(shared_session: Any, bob: Any) -> None:
    make_busy(shared_session)
    mid = queue(bob, shared_session, "never mind")["message"]["id"]
    before = head(shared_session.id)
    response = client_for(bob).delete(url(shared_session, f"{mid}/"))
    assert response.status_code == 204, response.content
    assert not Message.objects.filter(pk=mid).exists()
    assert [(e["type"], e["properties"]) for e in log_after(shared_session.id, before)] == [
        ("message.removed", {"message_id": mid})
    ]


@pytest.mark.django_db
def test_owner_withdraws_an_editors_queued_message(shared_session: Any, alice: Any, bob: Any) -> None:
    make_busy(shared_session)
    mid = queue(bob, shared_session, "x")["message"]["id"]
    assert client_for(alice).delete(url(shared_session, f"{mid}/")).status_code == 204


@pytest.mark.django_db
def test_editor_cannot_withdraw_someone_elses_queued_message(shared_session: Any, alice: Any, bob: Any) -> None:
    make_busy(shared_session)
    mid = queue(alice, shared_session, "mine")["message"]["id"]
    before = head(shared_session.id)
    assert_error(client_for(bob).delete(url(shared_session, f"{mid}/")), 403, "permission_denied")
    assert Message.objects.get(pk=mid).status == "queued" and head(shared_session.id) == before


@pytest.mark.django_db
def test_viewer_and_outsider_cannot_withdraw(shared_session: Any, bob: Any, carol: Any, charlie: Any) -> None:
    make_busy(shared_session)
    mid = queue(bob, shared_session, "x")["message"]["id"]
    assert_error(client_for(carol).delete(url(shared_session, f"{mid}/")), 403, "permission_denied")
    assert_error(client_for(charlie).delete(url(shared_session, f"{mid}/")), 404, "not_found")
    assert Message.objects.get(pk=mid).status == "queued"


@pytest.mark.django_db
def test_withdrawing_a_message_that_is_not_queued_is_409_not_queued(shared_session: Any, bob: Any) -> None:
    mid = queue(bob, shared_session, "answered now")["message"]["id"]
    assert_error(client_for(bob).delete(url(shared_session, f"{mid}/")), 409, "not_queued")
    assert Message.objects.filter(pk=mid).exists()


@pytest.mark.django_db
def test_withdrawing_an_unknown_or_another_sessions_message_is_404(shared_session: Any, alice: Any, bob: Any) -> None:
    other = services.create_session(alice, title="other", agent="echo")
    make_busy(other)
    foreign = queue(alice, other, "elsewhere")["message"]["id"]
    assert_error(client_for(alice).delete(url(shared_session, "msg_nope/")), 404, "not_found")
    assert_error(client_for(alice).delete(url(shared_session, f"{foreign}/")), 404, "not_found")
    assert Message.objects.filter(pk=foreign).exists()


# ---------------------------------------------------------------- retry: refusals


def ended_reply(session: Any, user: Any, text: str = "hi", status: str = "completed") -> tuple[Message, Message]:
    """A user message and its ended reply, stored directly (the plain db runs no reply)."""
    posted = services.post_message(session.id, user, [{"type": "text", "text": text}])
    assert posted.reply is not None
    from sessions_app.models import ReplyRun

    ReplyRun.objects.filter(pk=posted.reply.pk).delete()
    Message.objects.filter(pk=posted.reply.pk).update(status=status)
    Session.objects.filter(pk=session.pk).update(status={"type": "idle"})
    posted.reply.refresh_from_db()
    return posted.message, posted.reply


@pytest.mark.django_db
def test_retry_of_a_user_message_is_400(shared_session: Any, bob: Any) -> None:
    user_message, _ = ended_reply(shared_session, bob)
    assert_error(client_for(bob).post(url(shared_session, f"{user_message.pk}/retry/"), {}, format="json"), 400, "bad_request")


@pytest.mark.django_db
def test_retry_of_a_reply_that_is_not_the_latest_is_409_not_latest(shared_session: Any, bob: Any) -> None:
    _, old = ended_reply(shared_session, bob, "one")
    ended_reply(shared_session, bob, "two")
    before = head(shared_session.id)
    assert_error(client_for(bob).post(url(shared_session, f"{old.pk}/retry/"), {}, format="json"), 409, "not_latest")
    assert head(shared_session.id) == before


@pytest.mark.django_db
def test_retry_of_a_still_streaming_reply_is_409_session_busy(shared_session: Any, bob: Any) -> None:
    reply = queue(bob, shared_session, "streaming")["reply_id"]
    assert_error(client_for(bob).post(url(shared_session, f"{reply}/retry/"), {}, format="json"), 409, "session_busy")


@pytest.mark.django_db
def test_retry_while_messages_are_queued_is_409_session_busy(shared_session: Any, bob: Any) -> None:
    _, reply = ended_reply(shared_session, bob)
    Message.objects.create(session=shared_session, role="user", author=bob, status="queued")
    assert_error(client_for(bob).post(url(shared_session, f"{reply.pk}/retry/"), {}, format="json"), 409, "session_busy")


@pytest.mark.django_db
def test_viewer_and_outsider_cannot_retry(shared_session: Any, bob: Any, carol: Any, charlie: Any) -> None:
    _, reply = ended_reply(shared_session, bob)
    assert_error(client_for(carol).post(url(shared_session, f"{reply.pk}/retry/"), {}, format="json"), 403, "permission_denied")
    assert_error(client_for(charlie).post(url(shared_session, f"{reply.pk}/retry/"), {}, format="json"), 404, "not_found")


@pytest.mark.django_db
def test_retry_of_an_unknown_message_is_404_and_unknown_fields_are_400(shared_session: Any, bob: Any) -> None:
    _, reply = ended_reply(shared_session, bob)
    assert_error(client_for(bob).post(url(shared_session, "msg_nope/retry/"), {}, format="json"), 404, "not_found")
    response = client_for(bob).post(url(shared_session, f"{reply.pk}/retry/"), {"x": 1}, format="json")
    assert_error(response, 400, "validation_error")


@pytest.mark.django_db
@pytest.mark.parametrize("status", ["completed", "error", "cancelled"])
def test_retry_of_the_latest_ended_reply_is_accepted_and_marks_it_superseded(
    shared_session: Any, bob: Any, status: str
) -> None:
    _, old = ended_reply(shared_session, bob, status=status)
    before = head(shared_session.id)
    response = client_for(bob).post(url(shared_session, f"{old.pk}/retry/"), {}, format="json")
    assert response.status_code == 202, response.content
    new_id = response.json()["reply_id"]
    assert set(response.json()) == {"reply_id"}
    events = log_after(shared_session.id, before)
    # The usual start of a reply, then the old reply marked as replaced.
    assert [e["type"] for e in events] == ["session.status", "message.created", "message.updated"]
    assert events[1]["properties"]["message"]["id"] == new_id
    assert events[2]["properties"] == {"message_id": old.pk, "status": status, "superseded_by": new_id}
    listed = {m["id"]: m for m in client_for(bob).get(url(shared_session)).json()["results"]}
    assert listed[old.pk]["superseded_by"] == new_id and listed[old.pk]["status"] == status
    assert "superseded_by" not in listed[new_id] and listed[new_id]["status"] == "streaming"


# ---------------------------------------------------------------- automatic titles


@pytest.mark.django_db
def test_an_untitled_session_takes_its_title_from_the_first_message(alice: Any) -> None:
    session = services.create_session(alice, title="", agent="echo")
    before = head(session.id)
    queue(alice, session, "  Why does\nthe login   page fail?  ")
    session.refresh_from_db()
    assert session.title == "Why does the login page fail?"
    updated = events_of(session, before, "session.updated")
    assert [e["properties"]["session"]["title"] for e in updated] == ["Why does the login page fail?"]
    assert log_after(session.id, before)[0]["type"] == "session.updated"


@pytest.mark.django_db
def test_an_automatic_title_is_at_most_60_characters(alice: Any) -> None:
    session = services.create_session(alice, title="", agent="echo")
    queue(alice, session, "word " * 40)
    session.refresh_from_db()
    assert 0 < len(session.title) <= 60 and session.title.startswith("word word")
    unbroken = services.create_session(alice, title="", agent="echo")
    queue(alice, unbroken, "x" * 500)
    unbroken.refresh_from_db()
    assert len(unbroken.title) == 60


@pytest.mark.django_db
def test_a_titled_session_keeps_its_title_and_only_the_first_message_names_one(
    shared_session: Any, alice: Any
) -> None:
    before = head(shared_session.id)
    queue(alice, shared_session, "something else")
    shared_session.refresh_from_db()
    assert shared_session.title == "Fix the login bug" and not events_of(shared_session, before, "session.updated")
    renamed = services.create_session(alice, title="", agent="echo")
    ended_reply(renamed, alice, "first")
    services.update_session(renamed, title="")
    after = head(renamed.id)
    queue(alice, renamed, "second")
    renamed.refresh_from_db()
    assert renamed.title == "" and not events_of(renamed, after, "session.updated")


# ---------------------------------------------------------------- with real replies

live = pytest.mark.django_db(transaction=True)


def user_texts_answered(session: Any) -> list[str]:
    """The texts the echo replies gave, in the order of their turns."""
    replies = Message.objects.filter(session=session, role="assistant").order_by("turn_at")
    return ["".join(p.text for p in r.parts.all()) for r in replies]


@live
def test_queued_messages_are_answered_in_posting_order_and_idle_comes_last(
    shared_session: Any, alice: Any, bob: Any, settings: Any
) -> None:
    settings.TANDEM_ECHO_DELAY_MS = 5
    sid = shared_session.id
    before = head(sid)
    first = post(bob, sid, " ".join(f"a{i}" for i in range(40)))
    second = post(alice, sid, "second")
    third = post(bob, sid, "third")
    assert second.json()["queued"] and third.json()["queued"], (second.content, third.content)
    wait_until(lambda: Message.objects.filter(session_id=sid, role="assistant", status="completed").count() == 3, 15)
    wait_idle(sid)
    events = log_after(sid, before)
    second_id, third_id = second.json()["message"]["id"], third.json()["message"]["id"]
    statuses = [e["properties"]["status"]["type"] for e in events if e["type"] == "session.status"]
    assert statuses == ["busy", "busy", "busy", "idle"]  # idle only once the queue is empty
    updated = [e for e in events if e["type"] == "message.updated"]
    assert [e["properties"] for e in updated] == [
        {"message_id": second_id, "status": "completed"}, {"message_id": third_id, "status": "completed"},
    ]
    # Each turn: message.updated → busy → the assistant's message.created.
    for e in updated:
        i = events.index(e)
        assert events[i + 1]["type"] == "session.status" and events[i + 2]["type"] == "message.created"
        assert events[i + 2]["properties"]["message"]["role"] == "assistant"
    assert [e["seq"] for e in events] == list(range(before + 1, before + 1 + len(events)))
    assert user_texts_answered(shared_session)[1:] == ["second", "third"]
    listed = client_for(bob).get(f"/api/sessions/{sid}/messages/").json()["results"]
    assert [(m["role"], m["parts"][0]["text"] if m["role"] == "user" else None) for m in listed] == [
        ("user", " ".join(f"a{i}" for i in range(40))), ("assistant", None),
        ("user", "second"), ("assistant", None), ("user", "third"), ("assistant", None),
    ]
    first_reply = first.json()["reply_id"]
    assert Message.objects.get(pk=first_reply).status == "completed"


@live
def test_interrupt_cancels_the_running_reply_and_answers_this_message_next(
    shared_session: Any, alice: Any, bob: Any, settings: Any
) -> None:
    settings.TANDEM_ECHO_DELAY_MS = 50
    sid = shared_session.id
    first = post(bob, sid, " ".join(f"w{i}" for i in range(200)))
    waiting = post(bob, sid, "waiting")
    assert waiting.json()["position"] == 1
    urgent = post(alice, sid, "urgent", if_busy="interrupt")
    assert urgent.status_code == 202 and urgent.json()["position"] == 1
    done = wait_for_completed(sid, 0, first.json()["reply_id"], timeout=5)
    assert done["properties"]["status"] == "cancelled"
    wait_until(lambda: Message.objects.filter(session_id=sid, role="assistant", status="completed").count() == 2, 15)
    wait_idle(sid)
    assert user_texts_answered(shared_session)[1:] == ["urgent", "waiting"]


@live
def test_retry_runs_a_new_reply_to_the_same_message(shared_session: Any, bob: Any) -> None:
    sid = shared_session.id
    first = post(bob, sid, "say it again")
    old = first.json()["reply_id"]
    wait_for_completed(sid, 0, old)
    wait_idle(sid)
    before = head(sid)
    response = client_for(bob).post(f"/api/sessions/{sid}/messages/{old}/retry/", {}, format="json")
    assert response.status_code == 202, response.content
    new = response.json()["reply_id"]
    wait_for_completed(sid, before, new)
    wait_idle(sid)
    # The agent answered the same user message and did not see the reply it replaces.
    assert "".join(p.text for p in Message.objects.get(pk=new).parts.all()) == "say it again"
    assert Message.objects.get(pk=old).superseded_by_id == new
    # The new reply is the latest now: retrying the old one again is refused.
    again = client_for(bob).post(f"/api/sessions/{sid}/messages/{old}/retry/", {}, format="json")
    assert_error(again, 409, "not_latest")


@live
def test_a_queued_message_whose_author_left_the_session_still_runs(
    shared_session: Any, alice: Any, bob: Any, settings: Any
) -> None:
    settings.TANDEM_ECHO_DELAY_MS = 20
    sid = shared_session.id
    post(alice, sid, " ".join(f"w{i}" for i in range(30)))
    queued = post(bob, sid, "from bob")
    assert queued.json()["queued"]
    services.remove_member(shared_session, username="bob")
    assert not Membership.objects.filter(session_id=sid, user=bob).exists()
    wait_until(lambda: Message.objects.filter(session_id=sid, role="assistant", status="completed").count() == 2, 15)
    wait_idle(sid)
    assert user_texts_answered(shared_session)[1] == "from bob"


def _waiting_for_a_lock() -> bool:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        return bool(cursor.fetchone()[0])


@pytest.mark.django_db(transaction=True)
def test_a_message_queued_while_the_reply_ends_is_answered_next(shared_session: Any, bob: Any, settings: Any) -> None:
    """The end of a reply waits for the session's lock while a post holds it; once the post
    commits its queued message, the end must see it and start its turn, not set the session
    idle with the message left waiting (as a queue count taken in the locking statement
    would: its snapshot predates the wait)."""
    if connection.vendor != "postgresql":
        pytest.skip("row locks and READ COMMITTED snapshots: PostgreSQL")
    settings.TANDEM_AGENT_MODE = "worker"  # no runner here: the test ends the reply itself
    sid = shared_session.id
    reply_id = post(bob, sid, "first").json()["reply_id"]
    [run] = services.claim_runs("runner-1", 10)
    assert run.message_id == reply_id
    locked, release = threading.Event(), threading.Event()
    posted: list[services.Posted] = []
    errors: list[BaseException] = []

    def poster() -> None:
        try:
            with transaction.atomic():
                lock_session(sid)
                locked.set()
                release.wait(10)
                posted.append(services.post_message(sid, bob, [{"type": "text", "text": "second"}]))
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        finally:
            connection.close()

    def finisher() -> None:
        try:
            assert services.finish_reply(sid, reply_id, runner="runner-1", status="completed")
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    holding = threading.Thread(target=poster)
    holding.start()
    assert locked.wait(10)
    ending = threading.Thread(target=finisher)
    ending.start()
    wait_until(_waiting_for_a_lock)  # the end of the reply is blocked on the session's lock
    release.set()
    holding.join(10)
    ending.join(10)
    assert not errors, errors
    [queued] = posted
    assert queued.position == 1  # posted while the first reply was still running
    assert Message.objects.get(pk=queued.message.pk).status == Message.Status.COMPLETED  # its turn came
    assert ReplyRun.objects.filter(session_id=sid).exclude(message_id=reply_id).exists()
    assert Session.objects.get(pk=sid).is_busy
