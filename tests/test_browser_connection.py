"""What the pages show about their connection when the server goes away and comes back
(issue 14, defects 1 and 2), and one live stream per browser shared by its tabs.

Real daphne processes are killed and restarted on the same port; the pages run the
client built from clients/js (static/js/tandem.js)."""
from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import expect

from sessions_app.models import Session
from tests.browser import save_screenshot
from tests.conftest import ServerProcess, start_server, token_for, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.browser]

LIVE = re.compile("^live$")
# The server is back and answers /healthz: the page is live again within 3 s by design
# (probes every 0.5–1 s, then one connection attempt). The bound here is wider because
# the machine is shared; the code before the fix waited up to 30 s (session pages, on
# polling) and ~19 s (the list page's back-off), far beyond it.
BACK_WITHIN = 10_000
DOWN_FOR = 5_000  # ms the server stays down in the tests below

# Records every state the connection indicator takes, so a test can say "never green".
WATCH_STATES = """(selector) => {
  const node = document.querySelector(selector);
  window.__states = [node.dataset.state];
  new MutationObserver(() => window.__states.push(node.dataset.state))
    .observe(node, { attributes: true, attributeFilter: ["data-state"] });
}"""


@pytest.fixture
def restartable(live: ServerProcess, tmp_path: Path) -> Iterator[Any]:
    """``kill()`` the live server like a crash; ``restart()`` one on the same port."""
    restarted: list[ServerProcess] = []

    class Control:
        @staticmethod
        def kill() -> None:
            live.proc.kill()
            live.proc.wait()

        @staticmethod
        def restart() -> ServerProcess:
            server = start_server({"TANDEM_AGENT_MODE": "inline", "TANDEM_ECHO_DELAY_MS": "15"}, tmp_path,
                                  name="restarted", port=live.port)
            restarted.append(server)
            return server

    yield Control
    for server in restarted:
        server.stop()


def open_session(page: Any, session_id: str) -> Any:
    page.goto(f"/s/{session_id}/")
    expect(page.locator("#connection")).to_have_attribute("data-state", LIVE, timeout=15_000)
    expect(page.locator("#messages-loading")).to_be_hidden()
    return page


def open_streams(server: ServerProcess, transport: str = r"(?!ws_doc\b)[^\"]*") -> int:
    """The server's own count of open event streams (/metrics): SSE and WebSocket, not the
    shared document's sockets unless asked (``transport="ws_doc"``)."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    pattern = r'^tandem_open_streams\{transport="' + transport + r'"\} ([0-9.e+]+)$'
    return int(sum(float(m) for m in re.findall(pattern, text, re.M)))


# ---------------------------------------------------------------- defect 1


def test_with_the_server_down_the_session_page_says_so_and_stops_sending(
    browse: Any, alice: Any, bob: Any, shared_session: Session, restartable: Any
) -> None:
    bob_page = open_session(browse(bob), shared_session.id)
    page = open_session(browse(alice), shared_session.id)
    expect(page.locator("#presence li[data-username='bob']")).to_be_visible()
    page.evaluate(WATCH_STATES, "#connection")

    restartable.kill()
    connection = page.locator("#connection")
    # Before the fix the page turned green "Connected (polling)" ~2.5 s after the kill
    # and stayed so while every poll failed: give it twice that.
    page.wait_for_timeout(DOWN_FOR)
    states = page.evaluate("window.__states")
    assert "polling" not in states and states.count("live") == 1, states  # live only before the kill
    expect(connection).to_have_attribute("data-state", "reconnecting")
    expect(connection).to_have_attribute("data-reason", "server_unreachable")
    expect(connection).to_contain_text("Server unreachable")
    expect(page.locator("#presence")).to_have_attribute("data-stale", "true")
    expect(page.locator("#send-button")).to_be_disabled()
    expect(page.get_by_role("button", name="Reconnect now")).to_be_visible()
    # Enter does not send either: the text stays, and the page says why.
    box = page.get_by_label("Message", exact=True)
    box.fill("written while the server is down")
    box.press("Enter")
    expect(page.locator("#composer-error")).to_contain_text("Not connected")
    expect(box).to_have_value("written while the server is down")
    save_screenshot(page, "connection-server-down")
    assert bob_page.locator("#connection").get_attribute("data-state") != "live"

    restartable.restart()
    expect(connection).to_have_attribute("data-state", LIVE, timeout=BACK_WITHIN)
    expect(page.locator("#presence")).to_have_attribute("data-stale", "false")
    expect(page.locator("#send-button")).to_be_enabled()
    expect(page.locator("#composer-error")).to_be_empty()
    expect(page.get_by_role("button", name="Reconnect now")).to_be_hidden()
    page.locator("#send-button").click()
    expect(page.locator("#messages > li.message-user").last).to_contain_text("written while the server is down")


def test_when_the_server_fails_polls_the_page_is_not_shown_as_connected(
    browse: Any, alice: Any, shared_session: Session, restartable: Any
) -> None:
    page = browse(alice)
    # The stream cannot connect (a proxy refuses it): the page falls back to polling.
    page.route_web_socket(re.compile(r"/ws/"), lambda ws: ws.close(code=1011, reason="blocked"))
    page.route(re.compile(r".*/stream/.*"), lambda route: route.abort())
    page.goto(f"/s/{shared_session.id}/")
    connection = page.locator("#connection")
    expect(connection).to_have_attribute("data-state", "polling", timeout=30_000)
    expect(connection).to_have_text("Connected (polling)")
    restartable.kill()
    expect(connection).to_have_attribute("data-state", "reconnecting", timeout=15_000)
    expect(connection).to_contain_text("unreachable")
    expect(page.locator("#send-button")).to_be_disabled()
    expect(page.locator("#presence")).to_have_attribute("data-stale", "true")
    restartable.restart()
    # Back, and still unable to stream: polling again, and Send works.
    expect(connection).to_have_attribute("data-state", "polling", timeout=30_000)
    expect(page.locator("#send-button")).to_be_enabled()


# ---------------------------------------------------------------- defect 2


def test_the_session_page_is_live_again_soon_after_the_server_answers(
    browse: Any, alice: Any, shared_session: Session, restartable: Any
) -> None:
    page = open_session(browse(alice), shared_session.id)
    page.evaluate(WATCH_STATES, "#connection")
    restartable.kill()
    page.wait_for_timeout(DOWN_FOR)  # long enough for the code before the fix to reach polling
    restartable.restart()
    expect(page.locator("#connection")).to_have_attribute("data-state", LIVE, timeout=BACK_WITHIN)
    assert "polling" not in page.evaluate("window.__states")


def test_the_list_page_is_live_again_soon_after_the_server_answers(
    browse: Any, alice: Any, restartable: Any
) -> None:
    page = browse(alice)  # logged in: the sessions list
    connection = page.locator("#list-connection")
    expect(connection).to_have_attribute("data-state", LIVE, timeout=15_000)
    restartable.kill()
    # Long enough for the back-off before the fix to grow to 8–16 s between attempts.
    page.wait_for_timeout(3 * DOWN_FOR)
    expect(connection).to_have_attribute("data-reason", "server_unreachable")
    expect(page.get_by_role("button", name="Reconnect now")).to_be_visible()
    restartable.restart()
    expect(connection).to_have_attribute("data-state", LIVE, timeout=BACK_WITHIN)
    expect(page.get_by_role("button", name="Reconnect now")).to_be_hidden()


@pytest.mark.parametrize("where", ["session", "list"])
def test_reconnect_now_connects_at_once(
    browse: Any, alice: Any, shared_session: Session, restartable: Any, where: str
) -> None:
    page = browse(alice)
    selector = "#list-connection" if where == "list" else "#connection"
    if where == "session":
        open_session(page, shared_session.id)
    connection = page.locator(selector)
    expect(connection).to_have_attribute("data-state", LIVE, timeout=15_000)
    # The page cannot see the server come back by itself: every probe fails.
    page.route("**/healthz", lambda route: route.abort())
    restartable.kill()
    expect(connection).to_have_attribute("data-reason", "server_unreachable", timeout=15_000)
    restartable.restart()
    expect(connection).not_to_have_attribute("data-state", LIVE, timeout=1)
    page.get_by_role("button", name="Reconnect now").click()
    expect(connection).to_have_attribute("data-state", LIVE, timeout=BACK_WITHIN)


# ---------------------------------------------------------------- one stream per browser


def test_ten_tabs_share_one_stream_and_a_new_leader_takes_over(
    browse: Any, live: ServerProcess, alice: Any, bob: Any, shared_session: Session
) -> None:
    first = browse(alice)
    context = first.context
    tabs = [first] + [context.new_page() for _ in range(9)]
    for tab in tabs:
        open_session(tab, shared_session.id)
    # One connection per stream for ten tabs: the session's stream and the sidebar's
    # user-level stream, one presence connection. (Each tab's document editor has a
    # WebSocket of its own: WebSockets are outside the browser's six-per-host limit.)
    wait_until(lambda: open_streams(live) == 2 and open_streams(live, "ws_doc") == 10, timeout=15)
    assert tabs[0].locator("#connection").get_attribute("data-tab") == "leader"
    assert all(tab.locator("#connection").get_attribute("data-tab") == "follower" for tab in tabs[1:])
    bob_api = httpx.Client(base_url=live.url, headers={"Authorization": f"Bearer {token_for(bob)}"}, timeout=15)
    presence = bob_api.get(f"/api/sessions/{shared_session.id}/presence/").json()
    assert [(row["user"]["username"], row["connections"]) for row in presence] == [("alice", 1)]

    def post(text: str) -> None:
        response = bob_api.post(f"/api/sessions/{shared_session.id}/messages/", json={"parts": [{"type": "text", "text": text}]})
        assert response.status_code in (201, 202), response.text

    post("one")
    for tab in tabs:
        expect(tab.locator("#messages > li.message-user")).to_have_count(1)
        expect(tab.locator("#messages > li.message-assistant .part-text").last).to_have_text("one", timeout=20_000)

    # Typing in a follower tab goes out through the leader's WebSocket.
    tabs[5].get_by_label("Message", exact=True).press_sequentially("hi")
    wait_until(lambda: bob_api.get(f"/api/sessions/{shared_session.id}/presence/").json()[0]["state"].get("typing"), timeout=10)

    tabs[0].close()  # the leader goes; what bob writes meanwhile must still arrive once
    post("two")
    rest = tabs[1:]
    wait_until(lambda: sum(t.locator("#connection").get_attribute("data-tab") == "leader" for t in rest) == 1, timeout=15)
    for tab in rest:
        expect(tab.locator("#connection")).to_have_attribute("data-state", LIVE)
        expect(tab.locator("#messages > li.message-user")).to_have_count(2)
        expect(tab.locator("#messages > li.message-assistant")).to_have_count(2)
        expect(tab.locator("#messages > li.message-assistant .part-text").last).to_have_text("two", timeout=20_000)
    wait_until(lambda: open_streams(live) == 2, timeout=15)
    post("three")
    for tab in rest:
        expect(tab.locator("#messages > li.message-user")).to_have_count(3)
        expect(tab.locator("#messages > li.message-assistant .part-text").last).to_have_text("three", timeout=20_000)
    assert open_streams(live) == 2
    bob_api.close()


def test_a_visible_follower_brings_a_leader_back_that_cannot_probe(
    browse: Any, alice: Any, shared_session: Session, restartable: Any
) -> None:
    # A hidden leader tab's timers are slowed to one a minute: here its probes never
    # answer at all, and the follower tab must notice the server's return for it.
    leader = open_session(browse(alice), shared_session.id)
    follower = open_session(leader.context.new_page(), shared_session.id)
    assert leader.locator("#connection").get_attribute("data-tab") == "leader"
    leader.route("**/healthz", lambda route: route.abort())
    restartable.kill()
    for tab in (leader, follower):
        expect(tab.locator("#connection")).to_have_attribute("data-reason", "server_unreachable", timeout=15_000)
    restartable.restart()
    for tab in (leader, follower):
        expect(tab.locator("#connection")).to_have_attribute("data-state", LIVE, timeout=BACK_WITHIN)
