"""The ``echo`` agent end to end (§7): a real reply runs on this process's runtime loop
while the test reads the persisted event log, which is exactly what every stream
replays and relays."""
from __future__ import annotations

from typing import Any

import pytest

from sessions_app.models import Message
from tests.conftest import client_for, wait_until
from tests.replies import head, log_after, post, wait_for_completed, wait_idle

pytestmark = [pytest.mark.django_db(transaction=True)]


def reply_events(events: list[dict[str, Any]], reply_id: str) -> list[dict[str, Any]]:
    return [
        e for e in events
        if e["type"] == "message.part.updated" and e["properties"]["message_id"] == reply_id
    ]


def deltas_and_final(events: list[dict[str, Any]], reply_id: str) -> tuple[str, str]:
    updates = reply_events(events, reply_id)
    deltas = "".join(e["properties"]["delta"] for e in updates if "delta" in e["properties"])
    finals = [e["properties"]["part"]["text"] for e in updates if "delta" not in e["properties"]]
    return deltas, finals[-1]


def echo_round_trip(user: Any, session_id: str, *texts: str) -> tuple[str, list[dict[str, Any]], str]:
    before = head(session_id)
    response = post(user, session_id, *texts)
    assert response.status_code == 202, response.content
    reply_id = response.json()["reply_id"]
    wait_for_completed(session_id, before, reply_id)
    wait_idle(session_id)
    return reply_id, log_after(session_id, before), response.json()["message"]["id"]


def test_post_is_accepted_and_the_reply_streams_in_protocol_order(shared_session: Any, bob: Any) -> None:
    text = "Hello brave new world, echo me back please"
    reply_id, events, user_message_id = echo_round_trip(bob, shared_session.id, text)

    assert [e["seq"] for e in events] == list(range(events[0]["seq"], events[0]["seq"] + len(events)))
    user_created, busy, assistant_created, *updates, completed, idle = events
    assert user_created["type"] == "message.created"
    user_message = user_created["properties"]["message"]
    assert user_message["id"] == user_message_id and user_message["role"] == "user"
    assert user_message["status"] == "completed" and user_message["author"]["username"] == "bob"
    assert [(p["type"], p["text"]) for p in user_message["parts"]] == [("text", text)]
    assert busy["type"] == "session.status" and busy["properties"] == {"status": {"type": "busy"}}
    assert assistant_created["type"] == "message.created"
    assistant = assistant_created["properties"]["message"]
    assert assistant["id"] == reply_id and assistant["role"] == "assistant"
    assert assistant["status"] == "streaming" and assistant["parts"] == []

    assert all(e["type"] == "message.part.updated" for e in updates) and len(updates) >= 3
    start, *deltas, final = updates
    part_id = start["properties"]["part"]["id"]
    assert start["properties"] == {"message_id": reply_id, "part": {"id": part_id, "type": "text", "text": ""}}
    assert deltas and all(set(d["properties"]) == {"message_id", "part", "delta"} for d in deltas)
    assert all(d["properties"]["part"] == {"id": part_id, "type": "text"} for d in deltas)  # no text so far
    assert "delta" not in final["properties"]
    assert final["properties"]["part"] == {"id": part_id, "type": "text", "text": text}
    assert "".join(d["properties"]["delta"] for d in deltas) == text

    assert completed["type"] == "message.completed"
    assert completed["properties"] == {"message_id": reply_id, "status": "completed"}
    assert idle["type"] == "session.status" and idle["properties"] == {"status": {"type": "idle"}}
    stored = Message.objects.get(pk=reply_id)
    assert stored.status == "completed" and stored.completed_at is not None
    assert [p.text for p in stored.parts.all()] == [text]


def test_deltas_of_a_long_message_are_coalesced(shared_session: Any, bob: Any, settings: Any) -> None:
    settings.TANDEM_ECHO_DELAY_MS = 1
    words = [f"w{i}" for i in range(200)]
    text = " ".join(words)
    reply_id, events, _ = echo_round_trip(bob, shared_session.id, text)
    deltas = [e for e in reply_events(events, reply_id) if "delta" in e["properties"]]
    assert len(deltas) <= len(words) // 4, f"{len(deltas)} delta events for {len(words)} words"
    assert "".join(d["properties"]["delta"] for d in deltas) == text
    print(f"\necho: {len(words)} words in {len(deltas)} delta events")


def test_abort_ends_the_reply_cancelled_within_a_second_and_the_session_goes_idle(
    shared_session: Any, bob: Any, settings: Any
) -> None:
    settings.TANDEM_ECHO_DELAY_MS = 20
    text = " ".join(f"w{i}" for i in range(300))  # ~6 s of streaming
    sid = shared_session.id
    before = head(sid)
    response = post(bob, sid, text)
    assert response.status_code == 202, response.content
    reply_id = response.json()["reply_id"]
    wait_until(lambda: any("delta" in e["properties"] for e in reply_events(log_after(sid, before), reply_id)))

    aborted = client_for(bob).post(f"/api/sessions/{sid}/abort/", {}, format="json")
    assert aborted.status_code == 200 and aborted.json() == {"aborted": True}
    completed = wait_for_completed(sid, before, reply_id, timeout=1.0)
    assert completed["properties"] == {"message_id": reply_id, "status": "cancelled"}
    wait_idle(sid, timeout=1.0)

    events = log_after(sid, before)
    assert events[-1]["type"] == "session.status" and events[-1]["properties"]["status"] == {"type": "idle"}
    assert events[-2] == completed
    deltas, final_text = deltas_and_final(events, reply_id)
    assert deltas == final_text  # nothing pending was lost on abort
    assert 0 < len(final_text) < len(text) and text.startswith(final_text)
    assert events[-3]["type"] == "message.part.updated" and "delta" not in events[-3]["properties"]
    stored = Message.objects.get(pk=reply_id)
    assert stored.status == "cancelled" and [p.text for p in stored.parts.all()] == [final_text]
    health = client_for(bob).get(f"/api/sessions/{sid}/health/").json()
    assert health["status"] == {"type": "idle"} and health["run"] is None


def test_abort_on_an_idle_session_reports_nothing_aborted(shared_session: Any, bob: Any) -> None:
    before = head(shared_session.id)
    response = client_for(bob).post(f"/api/sessions/{shared_session.id}/abort/", {}, format="json")
    assert response.status_code == 200 and response.json() == {"aborted": False}
    assert head(shared_session.id) == before  # and nothing was published


def test_second_post_while_a_reply_streams_with_if_busy_reject_is_refused_as_session_busy(
    shared_session: Any, bob: Any, alice: Any, settings: Any
) -> None:
    settings.TANDEM_ECHO_DELAY_MS = 20
    sid = shared_session.id
    first = post(bob, sid, " ".join(f"w{i}" for i in range(200)))
    assert first.status_code == 202, first.content
    before = head(sid)
    second = post(alice, sid, "me too", if_busy="reject")
    assert second.status_code == 409
    assert second.json()["error"]["code"] == "session_busy"
    assert head(sid) == before or all(  # the refused post published nothing of its own
        e["properties"].get("message", {}).get("role") != "user" for e in log_after(sid, before)
    )
    assert client_for(bob).post(f"/api/sessions/{sid}/abort/", {}, format="json").json() == {"aborted": True}
    wait_for_completed(sid, 0, first.json()["reply_id"], timeout=5)
    wait_idle(sid, timeout=5)
    assert Message.objects.filter(session_id=sid, role="user").count() == 1


def test_several_text_parts_are_echoed_joined_by_a_blank_line(shared_session: Any, bob: Any) -> None:
    reply_id, events, _ = echo_round_trip(bob, shared_session.id, "first part", "second  part\n", "third")
    deltas, final_text = deltas_and_final(events, reply_id)
    assert final_text == "first part\n\nsecond  part\n\n\nthird"
    assert deltas == final_text


@pytest.mark.parametrize(
    "text",
    [
        "  leading and trailing  ",
        "tabs\tand\t\tdouble  spaces\n\nand a paragraph\r\nwith CRLF",
        "\n\n  indented\n    code block\n",
        "unicode: héllo wörld — 你好 🎉  end",
    ],
)
def test_echo_keeps_whitespace_exactly(shared_session: Any, bob: Any, text: str) -> None:
    reply_id, events, _ = echo_round_trip(bob, shared_session.id, text)
    user_created = events[0]["properties"]["message"]
    assert user_created["parts"][0]["text"] == text
    deltas, final_text = deltas_and_final(events, reply_id)
    assert final_text == text and deltas == text
    assert Message.objects.get(pk=reply_id).parts.get().text == text


def test_abort_before_the_agent_has_started_still_cancels_the_reply(
    shared_session: Any, bob: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    from sessions_app import services

    # Hold the run in its set-up (reading the history) so the abort lands before the
    # agent's task has taken its first step.
    slow_context = services.reply_context

    def reply_context(session_id: str, message_id: str) -> dict[str, Any]:
        time.sleep(0.3)
        return slow_context(session_id, message_id)

    monkeypatch.setattr(services, "reply_context", reply_context)
    sid = shared_session.id
    before = head(sid)
    response = post(bob, sid, "never echoed")
    assert response.status_code == 202, response.content
    reply_id = response.json()["reply_id"]
    assert client_for(bob).post(f"/api/sessions/{sid}/abort/", {}, format="json").json() == {"aborted": True}
    completed = wait_for_completed(sid, before, reply_id, timeout=1.5)
    assert completed["properties"]["status"] == "cancelled"
    wait_idle(sid, timeout=1.0)
    assert reply_events(log_after(sid, before), reply_id) == []  # no part was ever opened


def test_a_reply_whose_abort_was_asked_before_its_claim_is_cancelled_at_once(
    shared_session: Any, bob: Any, settings: Any
) -> None:
    """The claim returns the run's row: an abort flagged before it (racing with the
    claim) stops the reply before its agent starts, without another read."""
    import asyncio

    from sessions_app import services
    from sessions_app.agents.runner import Run
    from sessions_app.models import ReplyRun

    settings.TANDEM_AGENT_MODE = "worker"  # nobody claims it but this test
    sid = shared_session.id
    before = head(sid)
    reply_id = post(bob, sid, "never echoed").json()["reply_id"]
    ReplyRun.objects.filter(pk=reply_id).update(abort_requested=True)
    [claimed] = services.claim_runs("runner-1", 10)
    assert claimed.abort_requested
    run = Run(claimed.session_id, claimed.message_id, claimed.agent, "runner-1",
              abort_requested=claimed.abort_requested)
    asyncio.run(run.run())
    completed = wait_for_completed(sid, before, reply_id, timeout=2)
    assert completed["properties"]["status"] == "cancelled"
    assert reply_events(log_after(sid, before), reply_id) == []
