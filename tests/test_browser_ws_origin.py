"""Cross-site WebSocket hijacking in a real Chromium (issue 10, item 1): a page on the
same host but another port is same-site, so the browser sends the victim's session cookie
with its WebSocket handshake. Only the server's own origin and TANDEM_ALLOWED_ORIGINS may
use it."""
from __future__ import annotations

import re
from typing import Any

import pytest

from tests.conftest import PASSWORD

pytestmark = [pytest.mark.slow, pytest.mark.browser]

# Opens the session's socket with whatever cookie the browser holds for the server, and
# tries to publish as its user.
PUBLISH = """async ([url, type]) => new Promise((resolve) => {
  const socket = new WebSocket(url);
  const done = (result) => { try { socket.close(); } catch (e) {} resolve(result); };
  socket.onmessage = (m) => {
    const frame = JSON.parse(m.data);
    if (frame.type === "server.connected") {
      socket.send(JSON.stringify({type: "publish", id: "p", event: {type, properties: {}}}));
    } else if (frame.id === "p") {
      done(frame.type);
    }
  };
  socket.onclose = (e) => done("closed " + e.code);
  setTimeout(() => done("timeout"), 8000);
})"""


def test_page_on_another_port_cannot_publish_with_the_victims_cookie(
    chromium: Any, servers: Any, other_origins: list[str], alice: Any, bob: Any
) -> None:
    from events_app.models import Event
    from sessions_app import services

    foreign, allowed = other_origins
    (server,) = servers(1, TANDEM_ALLOWED_ORIGINS=allowed)
    session = services.create_session(alice, title="private", agent="echo")
    services.add_member(session, username="bob", role="editor")
    socket_url = f"ws://127.0.0.1:{server.port}/ws/sessions/{session.id}/"

    context = chromium.new_context()
    context.set_default_timeout(10_000)
    try:
        page = context.new_page()
        page.goto(f"{server.url}/accounts/login/")  # bob signs in: his browser holds the cookie
        page.get_by_label("Username").fill("bob")
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_role("button", name="Log in").click()
        page.wait_for_url(re.compile(r".*/$"))

        page.goto(f"{foreign}/")
        assert page.evaluate(PUBLISH, [socket_url, "attack.from_other_port"]).startswith("closed")

        page.goto(f"{allowed}/")
        assert page.evaluate(PUBLISH, [socket_url, "note.from_allowed_origin"]) == "ack"

        page.goto(f"{server.url}/healthz")
        assert page.evaluate(PUBLISH, [socket_url, "note.from_own_origin"]) == "ack"
    finally:
        context.close()

    published = list(Event.objects.filter(session_id=session.id, type__contains=".from_").values_list("type", flat=True))
    assert sorted(published) == ["note.from_allowed_origin", "note.from_own_origin"]
