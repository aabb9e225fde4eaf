"""Agents and the shared document (PROTOCOL §10): the ``tools`` agent's ``!doc append``
through the permission flow, and the ``openai`` agent's document context and its
``doc_read``/``doc_edit`` tools against the fake provider. An approved edit is the
agent's (``doc.updated`` ``by: "agent"``); a rejected or refused one changes nothing."""
from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async

from sessions_app import doc as docs
from sessions_app import permissions
from sessions_app.models import Message, PermissionRequest, Session
from tests.conftest import token_for
from tests.docpeer import DocPeer, InProcessTransport, SocketTransport
from tests.fake_openai import (  # noqa: F401  (fake_openai is a fixture)
    FakeOpenAI,
    chunk,
    fake_openai,
    stream,
    text_chunks,
    tool_call,
)
from tests.replies import head, log_after, post, wait_for_completed, wait_for_event
from tests.streamutil import bind_runtime, create_shared_session, eventually
from tests.test_sse_real_socket import api_client
from tests.test_tools_agent import answer, ask, reply_text, tool_statuses

pytestmark = [pytest.mark.django_db(transaction=True)]


def with_agent(session: Session, agent: str) -> Session:
    Session.objects.filter(pk=session.pk).update(agent=agent)
    session.refresh_from_db()
    return session


@pytest.fixture
def tools_session(shared_session: Session) -> Session:
    return with_agent(shared_session, "tools")


@pytest.fixture
def ai_session(shared_session: Session) -> Session:
    return with_agent(shared_session, "openai")


def doc_events(session_id: str, after: int) -> list[dict[str, Any]]:
    return [e["properties"] for e in log_after(session_id, after) if e["type"] == "doc.updated"]


# ---------------------------------------------------------------- tools: !doc append


def test_approved_doc_append_adds_a_paragraph_as_the_agent(tools_session: Session, alice: Any, bob: Any) -> None:
    docs.apply_edits(alice, tools_session.id, [{"at": 0, "insert": "# Plan"}])
    before, reply_id, permission = ask(bob, tools_session, "!doc append Ship on *Friday*.\nThen rest.")
    assert permission["tool"] == "doc_edit"
    assert permission["input"] == {"append": "Ship on *Friday*.\nThen rest."}
    assert docs.read_doc(tools_session.id).text == "# Plan"  # nothing before the answer

    assert answer(alice, tools_session, permission["id"], approved=True).status_code == 200
    wait_for_completed(tools_session.id, before, reply_id)
    assert docs.read_doc(tools_session.id).text == "# Plan\n\nShip on *Friday*.\nThen rest."
    assert reply_text(reply_id) == "I added it to the document as a new paragraph."
    events = log_after(tools_session.id, before)
    assert tool_statuses(events) == ["pending", "running", "completed"]
    done = [e for e in events if e["type"] == "tool.status"][-1]["properties"]
    state = docs.read_doc(tools_session.id)
    assert done["output"] == {"version": state.version, "chars": len(state.text)}
    updated = wait_for_event(tools_session.id, before, "doc.updated")
    assert updated["properties"]["by"] == "agent"


def test_rejected_doc_append_leaves_the_document_unchanged(tools_session: Session, alice: Any, bob: Any) -> None:
    docs.apply_edits(alice, tools_session.id, [{"at": 0, "insert": "Keep me."}])
    version = docs.read_doc(tools_session.id).version
    before, reply_id, permission = ask(bob, tools_session, "!doc append Overwrite everything")
    answer(alice, tools_session, permission["id"], approved=False, reason="not in the plan")
    wait_for_completed(tools_session.id, before, reply_id)
    state = docs.read_doc(tools_session.id)
    assert (state.text, state.version) == ("Keep me.", version)
    assert reply_text(reply_id).startswith("I did not change the document (Permission rejected")
    assert "not in the plan" in reply_text(reply_id)
    assert tool_statuses(log_after(tools_session.id, before)) == ["pending", "error"]
    assert doc_events(tools_session.id, before) == []


@pytest.mark.parametrize("text", ["!doc", "!doc append", "!doc append   ", "!doc replace x", "!doc\nappend"])
def test_doc_without_a_paragraph_answers_usage_and_asks_nothing(tools_session: Session, bob: Any, text: str) -> None:
    before = head(tools_session.id)
    reply_id = post(bob, tools_session.id, text).json()["reply_id"]
    wait_for_completed(tools_session.id, before, reply_id)
    assert reply_text(reply_id) == "Usage: !doc append <text>"
    assert not PermissionRequest.objects.filter(session=tools_session).exists()


async def test_an_approved_agent_edit_appears_live_in_an_open_editor(alice: Any, bob: Any, carol: Any, charlie: Any) -> None:
    bind_runtime()
    session = await create_shared_session(alice)
    await database_sync_to_async(Session.objects.filter(pk=session.id).update)(agent="tools")
    editor = DocPeer(InProcessTransport(session.id, {"token": token_for(bob)}))
    assert await editor.open() is None
    await editor.sync()
    await editor.edit(0, "Typed live.")
    await eventually(lambda: _version_is(session.id, 1))

    response = await sync_to_async(post)(bob, session.id, "!doc append Added by the agent.")
    assert response.status_code == 202, response.content
    pending = await eventually(lambda: _pending(session.id))
    assert (pending.tool, pending.input) == ("doc_edit", {"append": "Added by the agent."})
    await database_sync_to_async(permissions.answer_permission)(session, pending.id, alice, approved=True, reason=None)
    await editor.until(lambda: editor.value() == "Typed live.\n\nAdded by the agent.")
    await editor.close()


async def _version_is(session_id: str, version: int) -> bool:
    return (await database_sync_to_async(docs.read_doc)(session_id)).version == version


async def _pending(session_id: str) -> PermissionRequest | None:
    return await database_sync_to_async(
        PermissionRequest.objects.filter(session_id=session_id, status="pending").first
    )()


def test_doc_append_past_the_size_limit_is_a_tool_error(
    tools_session: Session, alice: Any, bob: Any, settings: Any
) -> None:
    settings.TANDEM_MAX_DOC_CHARS = 20
    docs.apply_edits(alice, tools_session.id, [{"at": 0, "insert": "0123456789"}])
    before, reply_id, permission = ask(bob, tools_session, "!doc append this is far too long to fit")
    answer(alice, tools_session, permission["id"], approved=True)
    wait_for_completed(tools_session.id, before, reply_id)
    assert docs.read_doc(tools_session.id).text == "0123456789"
    assert reply_text(reply_id).startswith("I could not change the document: ")
    assert tool_statuses(log_after(tools_session.id, before)) == ["pending", "running", "error"]


# ---------------------------------------------------------------- openai: context and tools


def start(user: Any, session: Session, text: str) -> tuple[int, str]:
    before = head(session.id)
    response = post(user, session.id, text)
    assert response.status_code == 202, response.content
    return before, response.json()["reply_id"]


def tool_result(fake: FakeOpenAI, request: int, call_id: str) -> Any:
    [message] = [m for m in fake.requests[request]["messages"] if m.get("tool_call_id") == call_id]
    return json.loads(message["content"])


def test_the_model_gets_the_document_as_context_and_both_tools(
    fake_openai: FakeOpenAI, ai_session: Session, alice: Any, bob: Any
) -> None:
    docs.apply_edits(alice, ai_session.id, [{"at": 0, "insert": "# Release notes\n\n- faster search"}])
    version = docs.read_doc(ai_session.id).version
    fake_openai.script(stream(*text_chunks("Noted.")))
    before, reply_id = start(bob, ai_session, "What is in the notes?")
    wait_for_completed(ai_session.id, before, reply_id)
    [body] = fake_openai.requests
    context = [m["content"] for m in body["messages"] if m["role"] == "system"][1]
    assert f"version {version}" in context
    assert "<document>\n# Release notes\n\n- faster search\n</document>" in context
    names = [t["function"]["name"] for t in body["tools"]]
    assert "doc_read" in names and "doc_edit" in names


def test_an_empty_document_is_said_to_be_empty(fake_openai: FakeOpenAI, ai_session: Session, bob: Any) -> None:
    fake_openai.script(stream(*text_chunks("ok")))
    before, reply_id = start(bob, ai_session, "hi")
    wait_for_completed(ai_session.id, before, reply_id)
    context = [m["content"] for m in fake_openai.requests[0]["messages"] if m["role"] == "system"][1]
    assert "It is empty (version 0)." in context and "<document>" not in context


def test_doc_read_needs_no_permission_and_returns_text_and_version(
    fake_openai: FakeOpenAI, ai_session: Session, alice: Any, bob: Any
) -> None:
    docs.apply_edits(alice, ai_session.id, [{"at": 0, "insert": "Draft"}])
    fake_openai.script(
        stream(chunk({"role": "assistant"}), tool_call(0, id="call_r", name="doc_read", arguments="{}"),
               chunk(finish_reason="tool_calls")),
        stream(*text_chunks("It says Draft.")),
    )
    before, reply_id = start(bob, ai_session, "read it")
    wait_for_completed(ai_session.id, before, reply_id)
    events = log_after(ai_session.id, before)
    assert not [e for e in events if e["type"].startswith("permission.")]
    assert tool_statuses(events) == ["pending", "running", "completed"]
    assert tool_result(fake_openai, 1, "call_r") == {"text": "Draft", "version": docs.read_doc(ai_session.id).version}


def test_an_approved_doc_edit_changes_the_document_as_the_agent(
    fake_openai: FakeOpenAI, ai_session: Session, alice: Any, bob: Any
) -> None:
    state = docs.apply_edits(alice, ai_session.id, [{"at": 0, "insert": "Ship Monday."}])
    edit = {"edits": [{"at": 5, "delete": 6, "insert": "Friday"}], "version": state.version}
    fake_openai.script(
        stream(chunk({"role": "assistant"}),
               tool_call(0, id="call_e", name="doc_edit", arguments=json.dumps(edit)),
               chunk(finish_reason="tool_calls")),
        stream(*text_chunks("Changed it.")),
    )
    before, reply_id = start(bob, ai_session, "make it Friday")
    requested = wait_for_event(ai_session.id, before, "permission.requested")["properties"]["permission"]
    assert requested["tool"] == "doc_edit" and requested["input"] == edit
    assert docs.read_doc(ai_session.id).text == "Ship Monday."
    assert answer(alice, ai_session, requested["id"], approved=True).status_code == 200
    wait_for_completed(ai_session.id, before, reply_id)
    after = docs.read_doc(ai_session.id)
    assert after.text == "Ship Friday."
    assert tool_result(fake_openai, 1, "call_e") == {"version": after.version, "chars": len("Ship Friday.")}
    assert wait_for_event(ai_session.id, before, "doc.updated")["properties"]["by"] == "agent"


def test_a_doc_edit_for_a_stale_version_is_refused_and_the_model_is_told(
    fake_openai: FakeOpenAI, ai_session: Session, alice: Any, bob: Any
) -> None:
    state = docs.apply_edits(alice, ai_session.id, [{"at": 0, "insert": "one"}])
    edit = {"edits": [{"at": 0, "delete": 3, "insert": "uno"}], "version": state.version}
    fake_openai.script(
        stream(chunk({"role": "assistant"}),
               tool_call(0, id="call_s", name="doc_edit", arguments=json.dumps(edit)),
               chunk(finish_reason="tool_calls")),
        stream(*text_chunks("I will read it again.")),
    )
    before, reply_id = start(bob, ai_session, "translate")
    requested = wait_for_event(ai_session.id, before, "permission.requested")["properties"]["permission"]
    docs.apply_edits(alice, ai_session.id, [{"at": 3, "insert": " two"}])  # someone edits meanwhile
    answer(alice, ai_session, requested["id"], approved=True)
    wait_for_completed(ai_session.id, before, reply_id)
    assert docs.read_doc(ai_session.id).text == "one two"
    error = tool_result(fake_openai, 1, "call_s")["error"]
    assert f"changed since version {state.version}" in error and "doc_read" in error
    assert Message.objects.get(pk=reply_id).status == "completed"


def test_an_approved_edit_out_of_range_changes_nothing_and_the_model_learns_the_length(
    fake_openai: FakeOpenAI, ai_session: Session, alice: Any, bob: Any
) -> None:
    docs.apply_edits(alice, ai_session.id, [{"at": 0, "insert": "short"}])
    fake_openai.script(
        stream(chunk({"role": "assistant"}),
               tool_call(0, id="call_o", name="doc_edit", arguments='{"edits": [{"at": 99, "insert": "x"}]}'),
               chunk(finish_reason="tool_calls")),
        stream(*text_chunks("Oops.")),
    )
    before, reply_id = start(bob, ai_session, "append at 99")
    requested = wait_for_event(ai_session.id, before, "permission.requested")["properties"]["permission"]
    answer(alice, ai_session, requested["id"], approved=True)
    wait_for_completed(ai_session.id, before, reply_id)
    assert docs.read_doc(ai_session.id).text == "short"
    error = tool_result(fake_openai, 1, "call_o")["error"]
    assert "past the end" in error and "the text has 5 characters" in error
    assert tool_statuses(log_after(ai_session.id, before)) == ["pending", "running", "error"]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"append": "x", "edits": [{"at": 0, "insert": "y"}]}, "Invalid input: Give either append or edits."),
        ({}, "Invalid input: Give either append or edits."),
        ({"append": "x", "version": 1}, "Invalid input: version goes with edits; append always adds at the end."),
        ({"edits": [{"at": -1}]}, "Invalid input: Argument edits.0.at: -1 is less than the minimum of 0."),
        (
            {"edits": [{"at": 0, "text": "y"}]},
            "Invalid input: Argument edits.0: Additional properties are not allowed ('text' was unexpected).",
        ),
        ({"append": 7}, "Invalid input: Argument append must be a string."),
    ],
)
def test_doc_edit_input_that_does_not_fit_is_refused_before_permission(
    fake_openai: FakeOpenAI, ai_session: Session, bob: Any, arguments: dict[str, Any], message: str
) -> None:
    fake_openai.script(
        stream(chunk({"role": "assistant"}),
               tool_call(0, id="call_b", name="doc_edit", arguments=json.dumps(arguments)),
               chunk(finish_reason="tool_calls")),
        stream(*text_chunks("Sorry.")),
    )
    before, reply_id = start(bob, ai_session, "edit badly")
    wait_for_completed(ai_session.id, before, reply_id)
    events = log_after(ai_session.id, before)
    assert not [e for e in events if e["type"].startswith("permission.")]
    assert [e["properties"].get("error") for e in events if e["type"] == "tool.status"][-1] == message
    assert docs.read_doc(ai_session.id).version == 0


# ---------------------------------------------------------------- worker mode, real processes


@pytest.mark.slow
@pytest.mark.redis
def test_a_workers_approved_edit_reaches_an_editor_on_the_server(
    servers: Any, shared_session: Session, alice: Any, bob: Any
) -> None:
    """With Redis the default is worker mode: the reply, and so the agent's edit, runs in
    a ``run_agents`` process; the editor is connected to a server process."""
    (server,) = servers(1, redis=True, workers=1)
    Session.objects.filter(pk=shared_session.pk).update(agent="tools")
    sid = shared_session.id

    async def main() -> str:
        base = server.url.replace("http://", "ws://")
        editor = DocPeer(SocketTransport(base, sid, {"token": token_for(bob)}))
        assert await editor.open() is None
        await editor.sync(timeout=10)
        with api_client(server, bob) as client:
            response = client.post(f"/api/sessions/{sid}/messages/",
                                   json={"parts": [{"type": "text", "text": "!doc append From a worker."}]})
            assert response.status_code == 202, response.text

            def pending() -> Any:
                found = client.get(f"/api/sessions/{sid}/permissions/", params={"status": "pending"}).json()
                return found[0] if found else None

            permission = await eventually(pending, timeout=15)
            assert permission["tool"] == "doc_edit"
        with api_client(server, alice) as owner:
            answered = owner.post(f"/api/sessions/{sid}/permissions/{permission['id']}/", json={"approved": True})
            assert answered.status_code == 200, answered.text
        await editor.until(lambda: editor.value() == "From a worker.", timeout=15)
        await editor.close()
        return editor.value()

    assert asyncio.run(main()) == "From a worker."
