"""Tandem as an MCP server, tested with the official ``mcp`` SDK's client: over
streamable HTTP at ``/mcp/`` of a real server process (Bearer JWT), over stdio
(``manage.py mcp_server`` with ``TANDEM_MCP_TOKEN``), and in process for the tools' bad
input. Roles and membership are the REST API's: charlie (no member) gets ``not_found``,
carol (viewer) cannot write. ``request_approval`` is a permission request a person
answers over REST (or in the browser: tests/test_browser_mcp.py); the client gets the
answer, and expiry counts as rejected."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import httpx2
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.server.mcpserver import Context
from rest_framework_simplejwt.tokens import RefreshToken

from events_app import fanout
from events_app.models import Event
from project.db import off_loop
from sessions_app import mcp_server
from sessions_app.models import Message, PermissionRequest, Session
from tests.conftest import ROOT, client_for, token_for, wait_until
from tests.conftest import test_database_url as database_url
from tests.helpers import assert_error
from tests.streamutil import bind_runtime, stream_groups

pytestmark = [pytest.mark.django_db(transaction=True)]

TOOLS = {
    "list_sessions", "read_messages", "post_message", "publish_event", "request_approval", "read_doc", "edit_doc",
}


def body(result: Any) -> dict[str, Any]:
    """A result's structured content, which its text repeats as JSON."""
    assert json.loads(result.content[0].text) == result.structured_content
    return result.structured_content  # type: ignore[no-any-return]


def error_code(result: Any) -> str:
    assert result.is_error, result
    return str(body(result)["error"]["code"])


@asynccontextmanager
async def over_http(url: str, token: str | None) -> AsyncIterator[Client]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx2.AsyncClient(headers=headers, timeout=30) as http:
        async with Client(streamable_http_client(f"{url}/mcp/", http_client=http)) as client:
            yield client


def in_process(user: Any) -> Client:
    async def identify(ctx: Context) -> int:
        return int(user.pk)

    return Client(mcp_server.build(identify))


def pending_permission(session: Session) -> PermissionRequest:
    return wait_until(  # type: ignore[no-any-return]
        lambda: PermissionRequest.objects.filter(session=session, status="pending").first(), timeout=20
    )


# ---------------------------------------------------------------- streamable HTTP


@pytest.fixture
def live(servers: Any) -> Any:
    [server] = servers(1)
    return server


def test_http_without_or_with_bad_credentials_is_401(live: Any, alice: Any) -> None:
    request = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    headers = {"Accept": "application/json, text/event-stream"}
    for auth in (None, "Bearer not-a-jwt", "Basic YWxpY2U6eA==", f"Bearer {RefreshToken.for_user(alice)}"):
        sent = {**headers, **({"Authorization": auth} if auth else {})}
        response = httpx.post(f"{live.url}/mcp/", json=request, headers=sent)
        assert response.status_code == 401, (auth, response.text)
        assert response.headers["www-authenticate"].startswith("Bearer")
        code = response.json()["error"]["code"]
        assert code == ("not_authenticated" if auth is None else "authentication_failed")


def test_http_bad_requests_with_good_credentials_get_a_clear_4xx(live: Any, alice: Any) -> None:
    auth = {"Authorization": f"Bearer {token_for(alice)}", "Accept": "application/json, text/event-stream"}
    cases = [
        ("POST", {**auth, "Content-Type": "application/json"}, b"{not json"),
        ("POST", {**auth, "Content-Type": "application/json"}, b"[]"),
        ("POST", {**auth, "Content-Type": "text/plain"}, b"hello"),
        ("POST", {**auth, "Content-Type": "application/json"}, b'{"jsonrpc": "2.0", "id": 1, "method": "nope"}'),
        ("POST", {**auth, "Content-Type": "application/json"}, b'{"a": "' + b"x" * 400_000 + b'"}'),
        ("PUT", auth, b""),
    ]
    for method, headers, content in cases:
        response = httpx.request(method, f"{live.url}/mcp/", headers=headers, content=content, timeout=30)
        assert 200 <= response.status_code < 500, (method, content[:30], response.status_code, response.text[:200])
        if response.status_code == 200:  # a JSON-RPC error, as the protocol answers
            assert "error" in response.json(), response.text[:200]


async def test_http_disabled_user_is_401(live: Any, alice: Any) -> None:
    token = token_for(alice)
    alice.is_active = False
    await off_loop(alice.save)()
    response = await off_loop(httpx.post)(
        f"{live.url}/mcp/", json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
        headers={"Authorization": f"Bearer {token}", "Accept": "application/json, text/event-stream"},
    )
    assert response.status_code == 401


async def test_http_client_with_an_api_key_acts_as_its_user_until_it_is_revoked(
    live: Any, shared_session: Session, bob: Any
) -> None:
    # What a static MCP client configuration carries: a key that does not expire.
    made = await off_loop(lambda: client_for(bob).post("/api/auth/keys/", {"name": "claude"}, format="json"))()
    assert made.status_code == 201, made.content
    key = made.json()
    async with over_http(live.url, key["key"]) as client:
        sessions = body(await client.call_tool("list_sessions", {}))["sessions"]
        assert [(s["id"], s["role"]) for s in sessions] == [(shared_session.id, "editor")]
    revoked = await off_loop(lambda: client_for(bob).delete(f"/api/auth/keys/{key['id']}/"))()
    assert revoked.status_code == 204
    request = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    headers = {"Accept": "application/json, text/event-stream", "Authorization": f"Bearer {key['key']}"}
    async with httpx.AsyncClient() as http:
        response = await http.post(f"{live.url}/mcp/", json=request, headers=headers)
    assert response.status_code == 401 and response.json()["error"]["code"] == "authentication_failed"


async def test_http_client_lists_tools_and_only_its_sessions(
    live: Any, shared_session: Session, bob: Any, charlie: Any
) -> None:
    async with over_http(live.url, token_for(bob)) as client:
        tools = {tool.name: tool for tool in (await client.list_tools()).tools}
        assert set(tools) == TOOLS
        assert tools["post_message"].input_schema["required"] == ["session_id", "text"]
        sessions = body(await client.call_tool("list_sessions", {}))["sessions"]
        assert [(s["id"], s["role"]) for s in sessions] == [(shared_session.id, "editor")]
    async with over_http(live.url, token_for(charlie)) as client:
        assert body(await client.call_tool("list_sessions", {})) == {"sessions": []}
        for tool, arguments in [
            ("read_messages", {"session_id": shared_session.id}),
            ("post_message", {"session_id": shared_session.id, "text": "hi"}),
            ("publish_event", {"session_id": shared_session.id, "type": "task.progress"}),
            ("request_approval", {"session_id": shared_session.id, "question": "ok?"}),
            ("read_doc", {"session_id": shared_session.id}),
            ("edit_doc", {"session_id": shared_session.id, "edits": [{"at": 0, "insert": "x"}]}),
        ]:
            assert error_code(await client.call_tool(tool, arguments)) == "not_found", tool


async def test_http_post_message_then_read_the_agents_reply(live: Any, shared_session: Session, bob: Any) -> None:
    async with over_http(live.url, token_for(bob)) as client:
        posted = body(await client.call_tool("post_message", {"session_id": shared_session.id, "text": "ping over mcp"}))
        assert posted["message"]["author"]["username"] == "bob"
        reply_id = posted["reply_id"]

        async def reply_done() -> dict[str, Any]:
            for _ in range(200):
                read = body(await client.call_tool("read_messages", {"session_id": shared_session.id}))
                reply = next(m for m in read["messages"] if m["id"] == reply_id)
                if reply["status"] == "completed":
                    return read
                await asyncio.sleep(0.1)
            raise AssertionError("the reply did not complete")

        read = await reply_done()
        texts = [(m["role"], "".join(p.get("text", "") for p in m["parts"])) for m in read["messages"]]
        assert texts == [("user", "ping over mcp"), ("assistant", "ping over mcp")]
        after = body(await client.call_tool(
            "read_messages", {"session_id": shared_session.id, "after": posted["message"]["id"]}
        ))
        assert [m["id"] for m in after["messages"]] == [reply_id]


async def test_http_approval_round_trip(live: Any, shared_session: Session, bob: Any, alice: Any) -> None:
    async with over_http(live.url, token_for(bob)) as client:
        asking = asyncio.ensure_future(client.call_tool(
            "request_approval",
            {"session_id": shared_session.id, "question": "Deploy v2 to production?", "details": {"commit": "abc123"}},
        ))
        permission = await off_loop(pending_permission)(shared_session)
        assert permission.tool == "approval" and permission.message_id is None
        assert permission.input == {"question": "Deploy v2 to production?", "asked_by": "bob", "details": {"commit": "abc123"}}
        answered = await off_loop(client_for(alice).post)(
            f"/api/sessions/{shared_session.id}/permissions/{permission.id}/",
            {"approved": True, "reason": "go"}, format="json",
        )
        assert answered.status_code == 200, answered.content
        result = body(await asyncio.wait_for(asking, 20))
    assert result["approved"] is True and result["status"] == "approved" and result["reason"] == "go"
    assert result["resolved_by"] == {"id": alice.pk, "username": "alice"}
    assert result["permission_id"] == permission.id
    # Shown like any permission request: requested, then resolved, in the session's log.
    types = await off_loop(lambda: list(
        Event.objects.filter(session_id=shared_session.id, type__startswith="permission.").values_list("type", flat=True)
    ))()
    assert types == ["permission.requested", "permission.resolved"]
    late = await off_loop(client_for(bob).post)(
        f"/api/sessions/{shared_session.id}/permissions/{permission.id}/", {"approved": False}, format="json"
    )
    assert_error(late, 409, "already_resolved")


# ---------------------------------------------------------------- stdio


def stdio_params(token: str, **extra: str) -> StdioServerParameters:
    env = {
        "DATABASE_URL": database_url(), "DJANGO_SETTINGS_MODULE": "project.settings",
        "TANDEM_MCP_TOKEN": token, "TANDEM_RATE_WRITE": "none", "PYTHONPATH": str(ROOT), **extra,
    }
    return StdioServerParameters(command=sys.executable, args=[str(ROOT / "manage.py"), "mcp_server"], env=env, cwd=str(ROOT))


async def test_stdio_approval_round_trip_and_expiry(shared_session: Session, bob: Any, carol: Any) -> None:
    async with Client(stdio_params(str(RefreshToken.for_user(bob)))) as client:
        assert {t.name for t in (await client.list_tools()).tools} == TOOLS
        sessions = body(await client.call_tool("list_sessions", {}))["sessions"]
        assert [s["id"] for s in sessions] == [shared_session.id]

        asking = asyncio.ensure_future(client.call_tool(
            "request_approval", {"session_id": shared_session.id, "question": "Merge the fix?"}
        ))
        permission = await off_loop(pending_permission)(shared_session)
        answered = await off_loop(client_for(carol).post)(  # a viewer may not answer
            f"/api/sessions/{shared_session.id}/permissions/{permission.id}/", {"approved": True}, format="json"
        )
        assert answered.status_code == 403
        answered = await off_loop(client_for(bob).post)(
            f"/api/sessions/{shared_session.id}/permissions/{permission.id}/",
            {"approved": False, "reason": "needs a test"}, format="json",
        )
        assert answered.status_code == 200
        result = body(await asyncio.wait_for(asking, 20))
        assert result["approved"] is False and result["status"] == "rejected"
        assert result["reason"] == "needs a test"

        expired = body(await client.call_tool(
            "request_approval", {"session_id": shared_session.id, "question": "Anyone?", "timeout_seconds": 0.5}
        ))
        assert expired["approved"] is False and expired["status"] == "expired"
        assert expired["resolved_by"] == "timeout"


async def test_stdio_post_and_publish_as_the_tokens_user(shared_session: Session, carol: Any, bob: Any) -> None:
    async with Client(stdio_params(token_for(carol))) as client:
        refused = await client.call_tool("post_message", {"session_id": shared_session.id, "text": "hi"})
        assert error_code(refused) == "permission_denied"
    async with Client(stdio_params(token_for(bob))) as client:
        envelope = body(await client.call_tool(
            "publish_event",
            {"session_id": shared_session.id, "type": "task.progress", "properties": {"percent": 40}},
        ))
    assert envelope["type"] == "task.progress"
    assert envelope["properties"] == {"percent": 40, "published_by": {"id": bob.pk, "username": "bob"}}


async def test_stdio_post_is_answered_by_a_server_process(live: Any, shared_session: Session, bob: Any) -> None:
    """The stdio process leaves replies to the server processes: it may exit with its
    client at any moment, and the reply goes on."""
    # Were the reply run here, it would still be streaming (slowly) when the client leaves.
    async with Client(stdio_params(token_for(bob), TANDEM_ECHO_DELAY_MS="1000")) as client:
        posted = body(await client.call_tool("post_message", {"session_id": shared_session.id, "text": "from stdio a b c d"}))
    reply = await off_loop(wait_until)(
        lambda: Message.objects.filter(pk=posted["reply_id"], status="completed").first(), 30
    )
    assert reply is not None
    parts = await off_loop(lambda: list(reply.parts.values_list("text", flat=True)))()
    assert "".join(parts) == "from stdio a b c d"


def test_stdio_refuses_to_start_without_a_good_token(alice: Any) -> None:
    env = {**os.environ, "DATABASE_URL": database_url(), "DJANGO_SETTINGS_MODULE": "project.settings"}
    command = [sys.executable, str(ROOT / "manage.py"), "mcp_server"]
    for token, complaint in [("", "TANDEM_MCP_TOKEN"), ("nonsense", "not a valid access or refresh token")]:
        done = subprocess.run(
            command, env={**env, "TANDEM_MCP_TOKEN": token}, cwd=ROOT, capture_output=True, text=True,
            timeout=60, stdin=subprocess.DEVNULL,
        )
        assert done.returncode != 0 and complaint in done.stderr, done.stderr
        assert done.stdout == ""  # stdout is the protocol's alone


async def test_stdio_user_disabled_after_start_is_refused(shared_session: Session, bob: Any) -> None:
    async with Client(stdio_params(token_for(bob))) as client:
        assert not (await client.call_tool("list_sessions", {})).is_error
        bob.is_active = False
        await off_loop(bob.save)()
        assert error_code(await client.call_tool("list_sessions", {})) == "authentication_failed"


# ---------------------------------------------------------------- the tools' input (in process)


@pytest.mark.parametrize(
    ("tool", "arguments", "code"),
    [
        ("post_message", {"text": "   "}, "validation_error"),
        ("post_message", {"text": "hi", "if_busy": "shout"}, "validation_error"),
        ("publish_event", {"type": "message.created"}, "validation_error"),
        ("publish_event", {"type": "Not A Type"}, "validation_error"),
        ("publish_event", {"type": "task.progress", "properties": {"published_by": 1}}, "validation_error"),
        ("publish_event", {"type": "task.progress", "properties": {"blob": "x" * 70000}}, "payload_too_large"),
        ("request_approval", {"question": " "}, "validation_error"),
        ("request_approval", {"question": "q" * 2001}, "validation_error"),
        ("request_approval", {"question": "ok?", "timeout_seconds": -1}, "validation_error"),
        ("read_messages", {"after": "msg_nope"}, "not_found"),
        ("edit_doc", {"edits": []}, "validation_error"),
        ("edit_doc", {"edits": [{"at": 5, "insert": "x"}]}, "validation_error"),
        ("edit_doc", {"edits": [{"at": 0, "insert": "x", "colour": "red"}]}, "validation_error"),
        ("edit_doc", {"edits": [{"at": 0, "insert": "x"}], "version": 7}, "version_conflict"),
    ],
)
async def test_bad_tool_input_gets_the_api_error(
    shared_session: Session, bob: Any, tool: str, arguments: dict[str, Any], code: str
) -> None:
    async with in_process(bob) as client:
        result = await client.call_tool(tool, {"session_id": shared_session.id, **arguments})
    assert error_code(result) == code
    assert await off_loop(PermissionRequest.objects.count)() == 0


async def test_arguments_of_the_wrong_type_are_refused_by_the_schema(shared_session: Session, bob: Any) -> None:
    async with in_process(bob) as client:
        result = await client.call_tool("read_messages", {"session_id": shared_session.id, "limit": 0})
        assert result.is_error and "limit" in result.content[0].text
        result = await client.call_tool("list_sessions", {"limit": "many"})
        assert result.is_error


async def test_ids_that_name_nothing_are_not_found(bob: Any) -> None:
    async with in_process(bob) as client:
        for session_id in ("ses_missing", "ses_\x00", "x" * 64):
            result = await client.call_tool("read_messages", {"session_id": session_id})
            assert error_code(result) == "not_found"


async def test_a_client_that_stops_waiting_withdraws_its_question(shared_session: Session, bob: Any) -> None:
    async with in_process(bob) as client:
        asking = asyncio.ensure_future(client.call_tool(
            "request_approval", {"session_id": shared_session.id, "question": "Still there?"}
        ))
        permission = await off_loop(pending_permission)(shared_session)
        asking.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asking
    stored = await off_loop(wait_until)(
        lambda: PermissionRequest.objects.filter(pk=permission.pk).exclude(status="pending").first(), 10
    )
    assert stored.status == "rejected" and stored.reason == "The agent that asked stopped waiting."


async def test_shared_document_read_and_edited_as_over_rest(
    shared_session: Session, bob: Any, carol: Any, settings: Any
) -> None:
    # doc.updated goes out at once, not from a timer that would outlive the test's database.
    settings.TANDEM_DOC_EVENT_SECONDS = 0
    async with in_process(bob) as client:
        assert body(await client.call_tool("read_doc", {"session_id": shared_session.id}))["text"] == ""
        edited = body(await client.call_tool(
            "edit_doc", {"session_id": shared_session.id, "edits": [{"at": 0, "insert": "# Plan\nShip it"}]}
        ))
        assert edited["text"] == "# Plan\nShip it" and edited["version"] >= 1
        again = body(await client.call_tool("edit_doc", {
            "session_id": shared_session.id, "version": edited["version"],
            "edits": [{"at": 7, "delete": 4, "insert": "Test"}],
        }))
        assert again["text"] == "# Plan\nTest it"
    rest = await off_loop(client_for(carol).get)(f"/api/sessions/{shared_session.id}/doc/")
    assert rest.json()["text"] == "# Plan\nTest it"
    async with in_process(carol) as client:
        assert body(await client.call_tool("read_doc", {"session_id": shared_session.id}))["text"] == "# Plan\nTest it"
        refused = await client.call_tool("edit_doc", {"session_id": shared_session.id, "edits": [{"at": 0, "insert": "x"}]})
        assert error_code(refused) == "permission_denied"
    announced = await off_loop(wait_until)(
        lambda: Event.objects.filter(session_id=shared_session.id, type="doc.updated").count() >= 2
    )
    assert announced


async def test_a_waiting_approval_is_woken_by_the_answer_itself(
    shared_session: Session, bob: Any, alice: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No rereads in this test's lifetime: only the answer's permission.resolved event,
    # through the session's group, can end the wait.
    monkeypatch.setattr(mcp_server, "APPROVAL_POLL_SECONDS", 3600.0)
    monkeypatch.setattr(mcp_server, "APPROVAL_RECHECK_SECONDS", 3600.0)
    bind_runtime()
    async with in_process(bob) as client:
        asking = asyncio.ensure_future(client.call_tool(
            "request_approval", {"session_id": shared_session.id, "question": "Ship it?"}
        ))
        permission = await off_loop(pending_permission)(shared_session)
        answered = await off_loop(client_for(alice).post)(
            f"/api/sessions/{shared_session.id}/permissions/{permission.id}/", {"approved": True}, format="json"
        )
        assert answered.status_code == 200, answered.content
        result = body(await asyncio.wait_for(asking, 20))
    assert result["approved"] is True and result["resolved_by"] == {"id": alice.pk, "username": "alice"}
    assert not stream_groups(fanout.get_hub())  # the wait left the session's group
