"""MCP both ways, with a person in a real browser: an agent in Tandem calls a tool of an
MCP server (``tests/mcp_test_server.py`` over stdio) once the person approves it; and an
outside MCP client's ``request_approval`` shows in the page like any permission request,
and the person's answer is what the client gets."""
from __future__ import annotations

import asyncio
import json
import sys
import threading
from pathlib import Path
from typing import Any

import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from playwright.sync_api import expect

from sessions_app.models import Session
from tests.browser import save_screenshot
from tests.conftest import token_for
from tests.test_browser_ui import assistant, open_session, send, wait_reply

pytestmark = [pytest.mark.slow, pytest.mark.browser]

SERVER_SCRIPT = str(Path(__file__).with_name("mcp_test_server.py"))


@pytest.fixture
def live(servers: Any) -> Any:
    """The browser harness's server, with the test MCP server configured as ``test``."""
    mcp_servers = {"test": {"command": sys.executable, "args": [SERVER_SCRIPT]}}
    (server,) = servers(
        1, TANDEM_ECHO_DELAY_MS="15", TANDEM_TOOL_TIMEOUT="30", TANDEM_MCP_SERVERS=json.dumps(mcp_servers)
    )
    return server


def test_agent_uses_an_mcp_tool_once_a_person_approves(browse: Any, alice: Any, shared_session: Session) -> None:
    Session.objects.filter(pk=shared_session.pk).update(agent="tools")
    page = open_session(browse(alice), shared_session.id)
    send(page, '!mcp test.add {"a": 2, "b": 40}')
    # Answered inline, on the tool card that asks.
    card = assistant(page).locator(".tool-card")
    approval = card.locator(".approval")
    expect(approval).to_be_visible(timeout=15_000)
    expect(card).to_contain_text("test.add")
    expect(card.locator(".tool-io")).to_contain_text('"b": 40')
    expect(card).to_have_attribute("data-status", "pending")
    save_screenshot(page, "mcp-tool-permission")
    approval.get_by_role("button", name="Approve running test.add").click()
    expect(approval).to_be_hidden(timeout=10_000)
    reply = wait_reply(page, 'test.add: {"result": 42}')
    card = reply.locator(".tool-card")
    expect(card).to_have_attribute("data-status", "completed")
    expect(card.locator(".tool-io")).to_contain_text("42")


def test_an_mcp_clients_question_is_answered_in_the_browser(
    browse: Any, live: Any, alice: Any, bob: Any, shared_session: Session
) -> None:
    page = open_session(browse(alice), shared_session.id)
    answer: dict[str, Any] = {}

    async def ask() -> None:
        headers = {"Authorization": f"Bearer {token_for(bob)}"}
        async with httpx2.AsyncClient(headers=headers, timeout=60) as http:
            async with Client(streamable_http_client(f"{live.url}/mcp/", http_client=http)) as client:
                result = await client.call_tool("request_approval", {
                    "session_id": shared_session.id, "question": "Rotate the staging database password?",
                })
                answer.update(result.structured_content or {})

    # Playwright's sync API owns this thread's event loop: the MCP client runs in its own.
    asking = threading.Thread(target=lambda: asyncio.run(ask()))
    asking.start()
    try:
        # A question has no tool card: it is answered in the banner, without a modal.
        question = page.get_by_role("group", name="Question from bob")
        expect(question).to_be_visible(timeout=20_000)
        expect(question).to_contain_text("bob asks, through an outside agent:")
        expect(question.locator(".approval-question")).to_have_text("Rotate the staging database password?")
        expect(page.locator("#pending-summary")).to_contain_text("bob asks a question")
        save_screenshot(page, "mcp-request-approval")
        question.get_by_label("Reason (optional)").fill("not during the release")
        question.get_by_role("button", name="Reject the question from bob").click()
        expect(question).to_be_hidden(timeout=10_000)
        expect(page.locator("#page-notice")).to_contain_text(
            "You rejected the question “Rotate the staging database password?” (“not during the release”)."
        )
    finally:
        asking.join(timeout=30)
    assert not asking.is_alive()
    assert answer["approved"] is False and answer["status"] == "rejected"
    assert answer["reason"] == "not during the release"
    assert answer["resolved_by"] == {"id": alice.pk, "username": "alice"}
