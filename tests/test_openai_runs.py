"""The ``openai`` agent through the whole stack: REST post, the runner, the permission
flow and the event log, against the real local fake provider."""
from __future__ import annotations

import time
from typing import Any

import pytest

from sessions_app.models import Message, Part, Session
from tests.conftest import client_for, wait_until
from tests.fake_openai import (
    FakeOpenAI,
    Hang,
    chunk,
    error,
    fake_openai,  # noqa: F401
    stream,
    text_chunks,
    tool_call,
)
from tests.replies import head, log_after, post, wait_for_completed, wait_for_event, wait_idle

pytestmark = [pytest.mark.django_db(transaction=True)]


@pytest.fixture
def ai_session(shared_session: Session) -> Session:
    Session.objects.filter(pk=shared_session.pk).update(agent="openai")
    shared_session.refresh_from_db()
    return shared_session


def start(user: Any, session: Session, text: str) -> tuple[int, str]:
    before = head(session.id)
    response = post(user, session.id, text)
    assert response.status_code == 202, response.content
    return before, response.json()["reply_id"]


def text_of(reply_id: str) -> str:
    return "".join(
        Part.objects.filter(message_id=reply_id, type=Part.PartType.TEXT).values_list("text", flat=True)
    )


def test_a_tool_call_goes_through_permission_and_back_to_the_model(
    fake_openai: FakeOpenAI, ai_session: Session, bob: Any, alice: Any
) -> None:
    fake_openai.script(
        stream(
            chunk({"role": "assistant"}),
            tool_call(0, id="call_1", name="calculator", arguments='{"expr'),
            tool_call(0, arguments='ession": "2*(3+4)"}'),
            chunk(finish_reason="tool_calls"),
            chunk(choices=False, usage={"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}),
        ),
        stream(
            *text_chunks("The answer ", "is 14."),
            chunk(choices=False, usage={"prompt_tokens": 20, "completion_tokens": 4, "total_tokens": 24}),
        ),
    )
    before, reply_id = start(bob, ai_session, "what is 2*(3+4)?")
    requested = wait_for_event(ai_session.id, before, "permission.requested")["properties"]["permission"]
    assert requested["tool"] == "calculator" and requested["call_id"] == "call_1"
    assert requested["input"] == {"expression": "2*(3+4)"}
    approved = client_for(alice).post(
        f"/api/sessions/{ai_session.id}/permissions/{requested['id']}/", {"approved": True}, format="json"
    )
    assert approved.status_code == 200
    completed = wait_for_completed(ai_session.id, before, reply_id)
    assert completed["properties"]["status"] == "completed"
    assert text_of(reply_id) == "The answer is 14."
    # The tool's result went back to the model with the call's id.
    second = fake_openai.requests[1]["messages"]
    assert second[-2]["tool_calls"][0]["id"] == "call_1"
    assert second[-1]["role"] == "tool" and second[-1]["tool_call_id"] == "call_1"
    assert "14" in second[-1]["content"]
    statuses = [e["properties"]["status"] for e in log_after(ai_session.id, before) if e["type"] == "tool.status"]
    assert statuses == ["pending", "running", "completed"]
    # Tool part first, then the text written after it.
    parts = list(Part.objects.filter(message_id=reply_id).order_by("index").values_list("type", flat=True))
    assert parts == ["tool", "text"]
    message = client_for(bob).get(f"/api/sessions/{ai_session.id}/messages/").json()["results"][-1]
    assert message["usage"] == {"prompt_tokens": 30, "completion_tokens": 9, "total_tokens": 39}


def test_history_is_sent_as_context(fake_openai: FakeOpenAI, ai_session: Session, bob: Any) -> None:
    fake_openai.script(stream(*text_chunks("first answer")), stream(*text_chunks("second answer")))
    before, first = start(bob, ai_session, "first question")
    wait_for_completed(ai_session.id, before, first)
    wait_idle(ai_session.id)
    before, second = start(bob, ai_session, "second question")
    wait_for_completed(ai_session.id, before, second)
    sent = [(m["role"], m["content"]) for m in fake_openai.requests[1]["messages"] if m["role"] != "system"]
    assert sent == [
        ("user", "first question"), ("assistant", "first answer"), ("user", "second question"),
    ]


def test_retries_show_as_session_status_retry(fake_openai: FakeOpenAI, ai_session: Session, bob: Any) -> None:
    fake_openai.script(error(503, "overloaded"), stream(*text_chunks("made it")))
    before, reply_id = start(bob, ai_session, "hello")
    wait_for_completed(ai_session.id, before, reply_id)
    statuses = [
        e["properties"]["status"] for e in log_after(ai_session.id, before) if e["type"] == "session.status"
    ]
    assert [s["type"] for s in statuses] == ["busy", "retry", "busy", "idle"]
    retry = statuses[1]
    assert retry["attempt"] == 1 and retry["message"] and retry["next_at"].endswith("Z")
    assert text_of(reply_id) == "made it"


@pytest.mark.parametrize(
    "response, code",
    [
        (error(400, "bad model"), "provider_error"),
        (stream(*text_chunks("partial")[:-1], {"error": {"message": "boom"}}, done=False), "provider_error"),
        (stream(chunk({"role": "assistant"}), chunk({"content": "slow"}), Hang(5), done=False), "provider_timeout"),
    ],
    ids=["http-400", "mid-stream-error", "stall"],
)
def test_provider_failures_end_the_message_with_a_code(
    fake_openai: FakeOpenAI, ai_session: Session, bob: Any, response: Any, code: str
) -> None:
    fake_openai.script(response)
    before, reply_id = start(bob, ai_session, "hello")
    completed = wait_for_completed(ai_session.id, before, reply_id)
    assert completed["properties"]["status"] == "error"
    assert completed["properties"]["error"]["code"] == code
    wait_idle(ai_session.id)
    message = Message.objects.get(pk=reply_id)
    assert message.status == "error" and message.error["code"] == code
    # Whatever text had streamed is kept, closed with its full state.
    events = log_after(ai_session.id, before)
    deltas = "".join(
        e["properties"].get("delta", "") for e in events
        if e["type"] == "message.part.updated" and e["properties"]["message_id"] == reply_id
    )
    assert deltas == text_of(reply_id)


def test_malformed_arguments_from_the_model_are_a_tool_error(
    fake_openai: FakeOpenAI, ai_session: Session, bob: Any
) -> None:
    fake_openai.script(
        stream(
            chunk({"role": "assistant"}),
            tool_call(0, id="call_x", name="calculator", arguments="{not json"),
            chunk(finish_reason="tool_calls"),
        ),
        stream(*text_chunks("Sorry, let me not.")),
    )
    before, reply_id = start(bob, ai_session, "calc something")
    wait_for_completed(ai_session.id, before, reply_id)
    events = log_after(ai_session.id, before)
    assert not [e for e in events if e["type"] == "permission.requested"]
    tool_events = [e["properties"] for e in events if e["type"] == "tool.status"]
    assert [t["status"] for t in tool_events] == ["pending", "error"]
    assert "Invalid input" in tool_events[-1]["error"]
    assert text_of(reply_id) == "Sorry, let me not."
    assert Message.objects.get(pk=reply_id).status == "completed"


def test_arguments_that_fail_the_schema_are_a_tool_error_the_model_reads(
    fake_openai: FakeOpenAI, ai_session: Session, bob: Any
) -> None:
    fake_openai.script(
        stream(
            chunk({"role": "assistant"}),
            tool_call(0, id="call_t", name="calculator", arguments='{"expression": 42}'),
            chunk(finish_reason="tool_calls"),
        ),
        stream(*text_chunks("I passed a number.")),
    )
    before, reply_id = start(bob, ai_session, "calc 42")
    wait_for_completed(ai_session.id, before, reply_id)
    events = log_after(ai_session.id, before)
    assert not [e for e in events if e["type"] == "permission.requested"]
    tool_events = [e["properties"] for e in events if e["type"] == "tool.status"]
    assert [t["status"] for t in tool_events] == ["pending", "error"]
    assert tool_events[-1]["error"] == "Invalid input: Argument expression must be a string."
    tool_message = fake_openai.requests[1]["messages"][-1]
    assert tool_message == {
        "role": "tool", "tool_call_id": "call_t",
        "content": '{"error": "Invalid input: Argument expression must be a string."}',
    }


def test_abort_closes_the_upstream_request_and_cancels(
    fake_openai: FakeOpenAI, ai_session: Session, bob: Any, settings: Any
) -> None:
    settings.TANDEM_OPENAI_TIMEOUT = 30.0
    fake_openai.script(stream(chunk({"role": "assistant"}), chunk({"content": "thinking"}), Hang(30), done=False))
    before, reply_id = start(bob, ai_session, "take your time")
    wait_for_event(
        ai_session.id, before, "message.part.updated", lambda e: e["properties"].get("delta") == "thinking"
    )
    aborted_at = time.monotonic()
    response = client_for(bob).post(f"/api/sessions/{ai_session.id}/abort/", {}, format="json")
    assert response.json() == {"aborted": True}
    completed = wait_for_completed(ai_session.id, before, reply_id, timeout=5)
    took = time.monotonic() - aborted_at
    assert completed["properties"]["status"] == "cancelled"
    assert took < 1.0, took  # the contract's bound
    wait_until(lambda: fake_openai.disconnects >= 1, timeout=5)
    assert text_of(reply_id) == "thinking"
