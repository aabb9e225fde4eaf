"""A session page that comes back after its missed events were pruned resyncs with one
page of messages, not the whole history (issue 14, defect 7). Its own module: the server
keeps only a few events per session here."""
from __future__ import annotations

import re
from typing import Any

import pytest
from playwright.sync_api import expect

from sessions_app.models import Message, Session
from tests.conftest import wait_until
from tests.test_browser_conversation import DESKTOP, history
from tests.test_browser_ui import LIVE, api_post, open_session, user_messages

# The fixture that also checks no page threw an uncaught error.
from tests.test_browser_ui import browse as browse

pytestmark = [pytest.mark.slow, pytest.mark.browser]


@pytest.fixture
def live(servers: Any) -> Any:
    """A server that keeps only the last 10 events of a session."""
    (server,) = servers(1, TANDEM_ECHO_DELAY_MS="1", TANDEM_EVENT_RETENTION_COUNT="10")
    return server


def test_a_resync_after_pruned_events_loads_one_page(
    browse: Any, live: Any, alice: Any, bob: Any, shared_session: Session
) -> None:
    history(shared_session, bob, 250)
    page = browse(alice, **DESKTOP)
    listed: list[str] = []
    page.on("request", lambda r: listed.append(r.url) if "/messages/" in r.url and r.method == "GET" else None)
    open_session(page, shared_session.id)
    expect(page.locator("#messages > li.message")).to_have_count(200)
    page.context.set_offline(True)
    expect(page.locator("#connection")).to_have_attribute("data-state", re.compile("offline|reconnecting"), timeout=10_000)
    for i in range(3):  # each post and its reply publish more events than the server keeps
        response = api_post(live, bob, f"/api/sessions/{shared_session.id}/messages/",
                            {"parts": [{"type": "text", "text": f"while away {i}"}]})
        assert response.status_code == 202, response.text
    replies = Message.objects.filter(session=shared_session, role="assistant", status="completed")
    wait_until(lambda: replies.count() == 3, timeout=20)
    page.context.set_offline(False)
    expect(page.locator("#connection")).to_have_attribute("data-state", LIVE, timeout=20_000)
    expect(user_messages(page).last).to_contain_text("while away", timeout=20_000)
    expect(page.locator("#messages > li.message")).to_have_count(200, timeout=20_000)
    assert len(listed) >= 2, listed  # it did resync
    assert all("latest=true" in url for url in listed), listed  # one page each time, never the whole history
    expect(page.get_by_role("button", name="Load older messages")).to_be_visible()
